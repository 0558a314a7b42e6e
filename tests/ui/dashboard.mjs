// Drives Baton's dashboard in Debian's headless Chromium, as a user would, against a live
// `baton up`. tests/dashboard.rs starts the cluster and runs this with:
//   BATON_URL      https://127.0.0.1:PORT
//   KUBECONFIG     the admin kubeconfig (for kubectl, which checks what the UI did)
//   ADMIN_TOKEN    a ServiceAccount token bound to cluster-admin
//   VIEW_TOKEN     a ServiceAccount token bound to view
//   DEPLOYMENT     the example Deployment's YAML, its image made local
//   TICKER         a pod that logs a line a second
//   ARTIFACTS      where the screenshots go
//   CLIENT_CERT    a client certificate (PEM) of a user bound to view, and its
//   CLIENT_KEY     key, which the browser presents when asked
//   ONLY           `client-certificate` to run that step alone: Playwright presents a
//                  certificate through a proxy of its own on loopback, so that step runs
//                  with Node and Chromium both inside the test's network namespace
// Each step waits on a condition in the page, never on a fixed delay, and fails with
// what it saw. Exit code 0 means every step passed.

import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const URL = env('BATON_URL');
const ARTIFACTS = env('ARTIFACTS');
mkdirSync(ARTIFACTS, { recursive: true });
const TIMEOUT = Number(process.env.STEP_TIMEOUT_MS || 60_000);

function kubectl(...args) {
  return execFileSync('kubectl', args, { encoding: 'utf8', env: process.env, stdio: ['pipe', 'pipe', 'pipe'] });
}
function kubectlIn(input, ...args) {
  return execFileSync('kubectl', args, { encoding: 'utf8', env: process.env, input, stdio: ['pipe', 'pipe', 'pipe'] });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});

let step = 0;
async function shot(page, name) {
  step += 1;
  const file = join(ARTIFACTS, `${String(step).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot ${file}`);
}

async function newPage() {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') console.log(`console: ${m.text()}`); });
  return page;
}

async function signIn(page, token) {
  await page.goto(`${URL}/ui/`);
  await page.waitForSelector('#token');
  await page.fill('#token', token);
  await page.click('#signin');
  await page.waitForSelector('#username');
  return page.textContent('#username');
}

// Rows of the live pods table whose Ready cell reads 1/1.
const readyRows = (page) => page.$$eval('table[data-resource="pods"] tbody tr', (rows) =>
  rows.filter((r) => [...r.cells].some((c) => c.textContent === '1/1')).map((r) => r.dataset.name));

const ONLY = process.env.ONLY || '';
let failed = false;
async function check(name, f) {
  // The client-certificate step runs alone (ONLY), the others together.
  if (name.includes('client certificate') !== (ONLY === 'client-certificate')) return;
  const started = Date.now();
  try {
    await f();
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failed = true;
    console.log(`FAIL ${name}: ${e.stack || e}`);
  }
}

const admin = ONLY ? null : await newPage();

await check('a wrong token is refused with a message', async () => {
  await admin.goto(`${URL}/ui/`);
  await admin.fill('#token', 'not-a-token');
  await admin.click('#signin');
  await admin.waitForSelector('[role="alert"]');
});

await check('log in with a token', async () => {
  const who = await signIn(admin, env('ADMIN_TOKEN'));
  if (!who.includes('dash-admin')) throw new Error(`signed in as ${who}`);
  await admin.waitForSelector('#nodes tbody tr');
  await shot(admin, 'overview');
});

await check("the example Deployment's pods turn Ready live", async () => {
  await admin.goto(`${URL}/ui/#/list/core/v1/pods`);
  await admin.waitForSelector('table[data-resource="pods"]');
  // A marker on the window: if the page reloaded, it would be gone.
  await admin.evaluate(() => { window.stayed = true; });
  kubectlIn(env('DEPLOYMENT'), 'apply', '-f', '-');
  await admin.waitForFunction(() => document.querySelectorAll('table[data-resource="pods"] tbody tr').length >= 2);
  await admin.waitForFunction(() => [...document.querySelectorAll('table[data-resource="pods"] tbody tr')]
    .filter((r) => r.dataset.name.startsWith('hello-') && [...r.cells].some((c) => c.textContent === '1/1')).length === 2);
  if (!(await admin.evaluate(() => window.stayed === true))) throw new Error('the page reloaded');
  await shot(admin, 'pods-ready');
});

await check('scale it to 3 from the UI and see 3 pods', async () => {
  await admin.goto(`${URL}/ui/#/obj/apps/v1/deployments/default/hello`);
  await admin.click('[data-action="scale"]');
  await admin.fill('#replicas', '3');
  await shot(admin, 'scale-dialog');
  await admin.click('[data-testid="confirm-ok"]');
  await admin.waitForFunction(() => [...document.querySelectorAll('table[data-resource="pods"] tbody tr')]
    .filter((r) => [...r.cells].some((c) => c.textContent === '1/1')).length === 3);
  await admin.waitForFunction(() => document.getElementById('ready-replicas')?.textContent === '3');
  const replicas = kubectl('get', 'deployment', 'hello', '-o', 'jsonpath={.spec.replicas}');
  if (replicas !== '3') throw new Error(`kubectl says ${replicas} replicas`);
  await shot(admin, 'scaled');
  const pods = await readyRows(admin);
  if (pods.length !== 3) throw new Error(`ready rows ${pods}`);
});

await check("a Wasm pod's page shows its component and counts its requests", async () => {
  const pod = (await readyRows(admin))[0];
  await admin.click(`a:text-is("${pod}")`);
  await admin.waitForSelector('#wasm .component-kind');
  const kind = await admin.textContent('#wasm .component-kind');
  if (kind !== 'http') throw new Error(`component kind ${kind}`);
  const ip = kubectl('get', 'pod', pod, '-o', 'jsonpath={.status.podIP}');
  for (let i = 0; i < 5; i++) {
    const resp = await fetch(`http://${ip}:8080/from-dashboard-test`);
    if (!resp.ok) throw new Error(`pod answered ${resp.status}`);
  }
  await admin.waitForFunction(() => Number(document.getElementById('http-requests')?.textContent) >= 5);
  await shot(admin, 'wasm-pod');
  await admin.goBack();
  await admin.waitForSelector('[data-action="edit"]');
});

await check('edit the YAML (server-side apply), confirmed', async () => {
  await admin.click('[data-action="edit"]');
  await admin.waitForSelector('#yaml-editor');
  const text = await admin.inputValue('#yaml-editor');
  const edited = text.replace(/^  labels:\n/m, '  labels:\n    edited-in: dashboard\n');
  if (edited === text) throw new Error(`no labels in:\n${text}`);
  await admin.fill('#yaml-editor', edited);
  await admin.click('[data-action="apply"]');
  await admin.click('[data-testid="confirm-ok"]');
  await admin.waitForSelector('text=Applied.');
  const label = kubectl('get', 'deployment', 'hello', '-o', 'jsonpath={.metadata.labels.edited-in}');
  if (label !== 'dashboard') throw new Error(`label is ${JSON.stringify(label)}`);
  const managers = kubectl('get', 'deployment', 'hello', '--show-managed-fields', '-o', 'jsonpath={.metadata.managedFields[*].manager}');
  if (!managers.includes('baton-dashboard')) throw new Error(`managers: ${managers}`);
});

await check('restart, confirmed, rolls the pods', async () => {
  // Cancel first: nothing may change.
  await admin.click('[data-action="restart"]');
  await admin.click('[data-testid="confirm-cancel"]');
  let at = kubectl('get', 'deployment', 'hello', '-o', 'jsonpath={.spec.template.metadata.annotations}');
  if (at.includes('restartedAt')) throw new Error('restarted although cancelled');
  await admin.click('[data-action="restart"]');
  await admin.click('[data-testid="confirm-ok"]');
  kubectl('rollout', 'status', 'deployment/hello', '--timeout=120s');
  at = kubectl('get', 'deployment', 'hello', '-o', 'jsonpath={.spec.template.metadata.annotations}');
  if (!at.includes('kubectl.kubernetes.io/restartedAt')) throw new Error(`annotations: ${at}`);
});

await check("open a pod's logs and see a new line appear", async () => {
  kubectlIn(env('TICKER'), 'apply', '-f', '-');
  kubectl('wait', '--for=condition=Ready', 'pod/ticker', '--timeout=120s');
  await admin.goto(`${URL}/ui/#/obj/core/v1/pods/default/ticker`);
  await admin.waitForFunction(() => /tick \d+/.test(document.getElementById('logs')?.textContent || ''));
  const last = () => admin.evaluate(() => Math.max(...[...(document.getElementById('logs').textContent.matchAll(/tick (\d+)/g))].map((m) => Number(m[1]))));
  const first = await last();
  await admin.waitForFunction((n) => [...document.getElementById('logs').textContent.matchAll(/tick (\d+)/g)].some((m) => Number(m[1]) > n), first);
  await admin.waitForSelector('#pod-status.ok');
  await admin.waitForSelector('#wasm .component-kind');
  const kind = await admin.textContent('#wasm .component-kind');
  if (kind !== 'cli') throw new Error(`component kind ${kind}`);
  await shot(admin, 'pod-logs');
});

await check('delete, confirmed', async () => {
  await admin.click('[data-action="delete"]');
  await admin.click('[data-testid="confirm-ok"]');
  await admin.waitForURL(/#\/list\/core\/v1\/pods$/);
  kubectl('wait', '--for=delete', 'pod/ticker', '--timeout=60s');
});

const viewer = ONLY ? null : await newPage();
await check('a view user gets no edit buttons, and the API refuses forced ones', async () => {
  const who = await signIn(viewer, env('VIEW_TOKEN'));
  if (!who.includes('dash-viewer')) throw new Error(`signed in as ${who}`);
  await viewer.goto(`${URL}/ui/#/obj/apps/v1/deployments/default/hello`);
  await viewer.waitForFunction(() => document.getElementById('ready-replicas')?.textContent === '3');
  await viewer.waitForSelector('table[data-resource="pods"] tbody tr');
  await viewer.waitForSelector('#object-actions[data-checked]', { state: 'attached' });
  const buttons = await viewer.$$eval('[data-action]', (b) => b.map((x) => x.dataset.action));
  if (buttons.length) throw new Error(`a view user sees ${buttons}`);
  await shot(viewer, 'viewer');
  // The same calls the buttons make, forced from the page with the viewer's token.
  const statuses = await viewer.evaluate(async () => {
    const auth = { Authorization: 'Bearer ' + sessionStorage.getItem('baton.token') };
    const scale = await fetch('/apis/apps/v1/namespaces/default/deployments/hello/scale', {
      method: 'PATCH', headers: { ...auth, 'Content-Type': 'application/merge-patch+json' }, body: '{"spec":{"replicas":1}}',
    });
    const del = await fetch('/apis/apps/v1/namespaces/default/deployments/hello', { method: 'DELETE', headers: auth });
    return [scale.status, del.status];
  });
  if (statuses.join() !== '403,403') throw new Error(`forced calls answered ${statuses}`);
  const replicas = kubectl('get', 'deployment', 'hello', '-o', 'jsonpath={.spec.replicas}');
  if (replicas !== '3') throw new Error(`kubectl says ${replicas} replicas`);
});

await check("log in with the browser's client certificate", async () => {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 860 },
    clientCertificates: [{ origin: URL, certPath: env('CLIENT_CERT'), keyPath: env('CLIENT_KEY') }],
  });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(`${URL}/ui/`);
  await page.click('#signin-cert');
  await page.waitForSelector('#username');
  const who = await page.textContent('#username');
  if (who !== 'dash-cert') throw new Error(`signed in as ${who}`);
  // Its rights are the certificate user's: view, so no buttons.
  await page.goto(`${URL}/ui/#/obj/apps/v1/deployments/default/hello`);
  await page.waitForSelector('#object-actions[data-checked]', { state: 'attached' });
  const buttons = await page.$$eval('[data-action]', (b) => b.map((x) => x.dataset.action));
  if (buttons.length) throw new Error(`a view user sees ${buttons}`);
  await shot(page, 'client-certificate');
  await context.close();
});

await browser.close();
process.exit(failed ? 1 : 0);
