// Baton's dashboard: one page of plain JavaScript, no build step. Every call goes to the
// Kubernetes API with the signed-in user's credentials (a bearer token, or the client
// certificate the browser presents), so the user sees and may change exactly what RBAC
// allows them; the server has no other door for it. Lists stay live through watch.
// The DOM is built with textContent only: object data never becomes markup.

const $main = document.getElementById('main');
const $nav = document.getElementById('nav');
const $who = document.getElementById('who');

// ---- credentials and the API ------------------------------------------------------

const session = {
  get token() { return sessionStorage.getItem('baton.token') || ''; },
  get cert() { return sessionStorage.getItem('baton.mode') === 'cert'; },
  get signedIn() { return this.cert || this.token !== ''; },
  get namespace() { return sessionStorage.getItem('baton.namespace') || ''; },
  set namespace(ns) { sessionStorage.setItem('baton.namespace', ns); },
  signOut() {
    sessionStorage.removeItem('baton.token');
    sessionStorage.removeItem('baton.mode');
  },
};

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(extra = {}) {
  const h = { Accept: 'application/json', ...extra };
  if (session.token) h.Authorization = 'Bearer ' + session.token;
  return h;
}

// A 401 means the credentials are gone or wrong: back to the login page, unless the
// login page itself is asking.
async function failure(resp, toLogin = true) {
  let message = resp.status + ' ' + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.message) message = body.message;
  } catch { /* not a Status */ }
  if (resp.status === 401 && toLogin) {
    session.signOut();
    location.hash = '#/login';
  }
  return new ApiError(resp.status, message);
}

async function api(path, { method = 'GET', body, contentType, accept, signal, toLogin } = {}) {
  const h = headers(contentType ? { 'Content-Type': contentType } : {});
  if (accept) h.Accept = accept;
  const resp = await fetch(path, { method, headers: h, body, signal, credentials: 'same-origin' });
  if (!resp.ok) throw await failure(resp, toLogin);
  const type = resp.headers.get('content-type') || '';
  return type.includes('json') ? resp.json() : resp.text();
}

// Lines of a streamed response (watch events, followed logs) as they arrive.
async function streamLines(path, signal, onLine) {
  const resp = await fetch(path, { headers: headers(), signal, credentials: 'same-origin' });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      onLine(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  }
  if (buf) onLine(buf);
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
});

// A list kept current: list, then watch from its resourceVersion; a watch that ends or
// expires (410) starts over with a fresh list, as client-go's reflector does.
async function watchList(path, signal, onChange, onError) {
  const sep = path.includes('?') ? '&' : '?';
  let failures = 0;
  while (!signal.aborted) {
    let items;
    let rv;
    try {
      const list = await api(path, { signal });
      items = new Map(list.items.map((o) => [o.metadata.uid, o]));
      rv = list.metadata.resourceVersion;
      onChange(items);
    } catch (e) {
      if (signal.aborted) return;
      onError?.(e);
      if (e.status === 403 || e.status === 404) return;
      await sleep(2000, signal);
      continue;
    }
    const began = Date.now();
    try {
      let expired = false;
      await streamLines(`${path}${sep}watch=1&allowWatchBookmarks=true&resourceVersion=${rv}`, signal, (line) => {
        if (!line.trim() || expired) return;
        const ev = JSON.parse(line);
        if (ev.type === 'ERROR') { expired = true; return; }
        if (ev.type === 'BOOKMARK') return;
        const uid = ev.object.metadata.uid;
        if (ev.type === 'DELETED') items.delete(uid); else items.set(uid, ev.object);
        onChange(items);
      });
      // A watch the server ends at once is a failure too: relisting in a tight loop
      // would only load it more.
      if (Date.now() - began < 1000) {
        failures += 1;
        await sleep(Math.min(30_000, 500 * 2 ** failures), signal);
      } else {
        failures = 0;
      }
    } catch (e) {
      if (signal.aborted) return;
      // Not allowed to watch: say so once, as for the list, rather than retry forever.
      if (e.status === 403 || e.status === 404) { onError?.(e); return; }
      failures += 1;
      await sleep(Math.min(30_000, 500 * 2 ** failures), signal);
    }
  }
}

// Polls while the page is open.
async function every(ms, signal, f) {
  while (!signal.aborted) {
    try { await f(); } catch (e) { if (signal.aborted) return; }
    await sleep(ms, signal);
  }
}

// ---- resources -----------------------------------------------------------------

const KINDS = {
  pods: { group: '', version: 'v1', plural: 'pods', kind: 'Pod', namespaced: true },
  deployments: { group: 'apps', version: 'v1', plural: 'deployments', kind: 'Deployment', namespaced: true, scale: true, restart: true },
  services: { group: '', version: 'v1', plural: 'services', kind: 'Service', namespaced: true },
  ingresses: { group: 'networking.k8s.io', version: 'v1', plural: 'ingresses', kind: 'Ingress', namespaced: true },
  jobs: { group: 'batch', version: 'v1', plural: 'jobs', kind: 'Job', namespaced: true },
  nodes: { group: '', version: 'v1', plural: 'nodes', kind: 'Node', namespaced: false },
  events: { group: '', version: 'v1', plural: 'events', kind: 'Event', namespaced: true },
};

// A resource by its path parts: a known one, or one the API's discovery describes (a
// custom resource), which says its kind and whether it is namespaced.
async function resource(group, version, plural) {
  const known = Object.values(KINDS).find((k) => k.group === group && k.plural === plural);
  if (known && known.version === version) return known;
  const r = { group, version, plural, kind: plural, namespaced: true };
  try {
    const list = await api(base(r));
    const found = list.resources.find((x) => x.name === plural);
    if (found) Object.assign(r, { kind: found.kind, namespaced: found.namespaced });
  } catch { /* shown by the page that reads it */ }
  return r;
}

const enc = encodeURIComponent;
const base = (r) => (r.group ? `/apis/${enc(r.group)}/${enc(r.version)}` : `/api/${enc(r.version)}`);
function collectionPath(r, ns) {
  return base(r) + (r.namespaced && ns ? `/namespaces/${enc(ns)}` : '') + `/${enc(r.plural)}`;
}
function objectPath(r, ns, name) {
  return collectionPath(r, ns) + `/${enc(name)}`;
}
const listHash = (r) => `#/list/${r.group || 'core'}/${r.version}/${r.plural}`;
const objectHash = (r, ns, name) => `#/obj/${r.group || 'core'}/${r.version}/${r.plural}/${ns || '_'}/${enc(name)}`;

// What the user may do, asked of the API (SelfSubjectAccessReview), cached per page.
let accessCache = new Map();
async function can(verb, r, ns, subresource = '', name = '') {
  const key = [verb, r.group, r.plural, ns, subresource, name].join('|');
  if (!accessCache.has(key)) {
    const review = {
      apiVersion: 'authorization.k8s.io/v1',
      kind: 'SelfSubjectAccessReview',
      spec: { resourceAttributes: { verb, group: r.group, resource: r.plural, namespace: ns || '', subresource, name } },
    };
    accessCache.set(key, api('/apis/authorization.k8s.io/v1/selfsubjectaccessreviews', {
      method: 'POST', body: JSON.stringify(review), contentType: 'application/json',
    }).then((r) => r.status.allowed === true).catch(() => false));
  }
  return accessCache.get(key);
}

// ---- formatting --------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function age(ts) {
  if (!ts) return '';
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  if (s < 120) return `${Math.floor(s)}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  if (s < 172800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

// A Kubernetes quantity as a number (cores for CPU, bytes for memory).
function quantity(q) {
  if (q === undefined || q === null) return NaN;
  const m = /^([0-9.]+)([a-zA-Z]*)$/.exec(String(q));
  if (!m) return NaN;
  const scale = { n: 1e-9, u: 1e-6, m: 1e-3, '': 1, k: 1e3, K: 1e3, M: 1e6, G: 1e9, T: 1e12, Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, Ti: 1024 ** 4 }[m[2]];
  return scale === undefined ? NaN : parseFloat(m[1]) * scale;
}
const cores = (n) => (isNaN(n) ? '–' : n < 1 ? `${(n * 1000).toFixed(0)}m` : n.toFixed(2));
function bytes(n) {
  if (isNaN(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function podStatus(p) {
  if (p.metadata.deletionTimestamp) return 'Terminating';
  for (const c of p.status?.containerStatuses || []) {
    if (c.state?.waiting?.reason) return c.state.waiting.reason;
    if (c.state?.terminated?.reason && p.status.phase === 'Running') return c.state.terminated.reason;
  }
  return p.status?.phase || 'Pending';
}
function podReady(p) {
  const cs = p.status?.containerStatuses || [];
  const total = p.spec.containers.length;
  return `${cs.filter((c) => c.ready).length}/${total}`;
}
const statusClass = (s) => (['Running', 'Succeeded', 'Ready', 'True', 'Complete'].includes(s) ? 'ok' : ['Pending', 'ContainerCreating', 'Terminating'].includes(s) ? 'warn' : 'bad');

// JSON as YAML, for reading and editing. Strings that YAML would read as something else
// are written JSON-quoted, which YAML reads back as the same string.
function toYaml(v, indent = '') {
  const scalar = (x) => {
    if (x === null) return 'null';
    if (typeof x !== 'string') return String(x);
    const plain = /^[A-Za-z_/][A-Za-z0-9_./ -]*$/.test(x) && !/ $/.test(x)
      && !/^(true|false|null|yes|no|on|off|y|n|~)$/i.test(x);
    return plain ? x : JSON.stringify(x);
  };
  const isObj = (x) => x !== null && typeof x === 'object';
  if (!isObj(v)) return scalar(v) + '\n';
  const lines = [];
  if (Array.isArray(v)) {
    if (!v.length) return '[]\n';
    for (const item of v) {
      if (isObj(item) && Object.keys(item).length) {
        const inner = toYaml(item, indent + '  ');
        lines.push(indent + '- ' + inner.slice(indent.length + 2));
      } else lines.push(indent + '- ' + toYaml(item, indent + '  ').trimStart());
    }
    return lines.join('');
  }
  if (!Object.keys(v).length) return '{}\n';
  for (const [k, x] of Object.entries(v)) {
    const key = scalar(k);
    if (isObj(x) && Object.keys(x).length) lines.push(`${indent}${key}:\n${toYaml(x, indent + '  ')}`);
    else lines.push(`${indent}${key}: ${toYaml(x, indent + '  ').trimStart()}`);
  }
  return lines.join('');
}

// ---- dialogs -------------------------------------------------------------------

const $confirm = document.getElementById('confirm');
function confirmAction(text, extra) {
  document.getElementById('confirm-text').textContent = text;
  const box = document.getElementById('confirm-extra');
  box.replaceChildren(...(extra ? [extra] : []));
  return new Promise((resolve) => {
    $confirm.addEventListener('close', () => resolve($confirm.returnValue === 'ok'), { once: true });
    $confirm.returnValue = '';
    $confirm.showModal();
  });
}

function showError(where, e) {
  where.replaceChildren(h('div', { class: 'error', role: 'alert' }, e.message || String(e)));
}

// ---- tables --------------------------------------------------------------------

const COLUMNS = {
  pods: [['Name', (o) => o.metadata.name], ['Ready', podReady], ['Status', podStatus, statusClass],
    ['Restarts', (o) => (o.status?.containerStatuses || []).reduce((n, c) => n + (c.restartCount || 0), 0)],
    ['Node', (o) => o.spec.nodeName || ''], ['IP', (o) => o.status?.podIP || '']],
  deployments: [['Name', (o) => o.metadata.name], ['Ready', (o) => `${o.status?.readyReplicas || 0}/${o.spec.replicas ?? 1}`],
    ['Up-to-date', (o) => o.status?.updatedReplicas || 0], ['Available', (o) => o.status?.availableReplicas || 0]],
  services: [['Name', (o) => o.metadata.name], ['Type', (o) => o.spec.type || 'ClusterIP'], ['Cluster IP', (o) => o.spec.clusterIP || ''],
    ['Ports', (o) => (o.spec.ports || []).map((p) => `${p.port}${p.nodePort ? ':' + p.nodePort : ''}/${p.protocol || 'TCP'}`).join(', ')]],
  ingresses: [['Name', (o) => o.metadata.name], ['Class', (o) => o.spec.ingressClassName || ''],
    ['Hosts', (o) => (o.spec.rules || []).map((r) => r.host || '*').join(', ')],
    ['Address', (o) => (o.status?.loadBalancer?.ingress || []).map((i) => i.ip || i.hostname).join(', ')]],
  jobs: [['Name', (o) => o.metadata.name], ['Completions', (o) => `${o.status?.succeeded || 0}/${o.spec.completions ?? 1}`],
    ['Status', (o) => ((o.status?.conditions || []).find((c) => c.status === 'True')?.type) || 'Running', statusClass]],
  nodes: [['Name', (o) => o.metadata.name],
    ['Status', (o) => ((o.status?.conditions || []).find((c) => c.type === 'Ready')?.status === 'True' ? 'Ready' : 'NotReady'), statusClass],
    ['Version', (o) => o.status?.nodeInfo?.kubeletVersion || '']],
  events: [['Type', (o) => o.type, (t) => (t === 'Normal' ? 'ok' : 'warn')], ['Reason', (o) => o.reason],
    ['Object', (o) => `${o.involvedObject?.kind}/${o.involvedObject?.name}`], ['Message', (o) => o.message],
    ['Count', (o) => o.count || 1], ['Last seen', (o) => age(o.lastTimestamp || o.eventTime || o.metadata.creationTimestamp)]],
};

// A table that follows a collection through watch.
function liveTable(r, { ns, labelSelector, fieldSelector, sort } = {}, signal) {
  const cols = COLUMNS[r.plural] || [['Name', (o) => o.metadata.name]];
  const showNs = r.namespaced && !ns;
  const tbody = h('tbody');
  const status = h('div');
  const table = h('table', { 'data-resource': r.plural },
    h('thead', {}, h('tr', {}, showNs && h('th', {}, 'Namespace'), cols.map(([t]) => h('th', {}, t)), r.plural !== 'events' && h('th', {}, 'Age'))),
    tbody);
  const q = new URLSearchParams();
  if (labelSelector) q.set('labelSelector', labelSelector);
  if (fieldSelector) q.set('fieldSelector', fieldSelector);
  const path = collectionPath(r, ns) + (q.toString() ? '?' + q : '');
  let pending = false;
  let latest;
  const draw = () => {
    pending = false;
    const items = [...latest.values()].sort(sort || ((a, b) =>
      (a.metadata.namespace || '').localeCompare(b.metadata.namespace || '') || a.metadata.name.localeCompare(b.metadata.name)));
    tbody.replaceChildren(...items.map((o) => h('tr', { 'data-name': o.metadata.name },
      showNs && h('td', {}, o.metadata.namespace),
      cols.map(([, f, cls], i) => {
        const v = f(o);
        const cell = h('td', { class: cls ? cls(v) : undefined }, i === 0 && r.plural !== 'events' ? h('a', { href: objectHash(r, o.metadata.namespace, o.metadata.name) }, v) : v);
        return cell;
      }),
      r.plural !== 'events' && h('td', {}, age(o.metadata.creationTimestamp)))));
    status.replaceChildren(items.length ? '' : h('p', { class: 'muted' }, `No ${r.plural}.`));
  };
  watchList(path, signal, (items) => {
    latest = items;
    if (!pending) { pending = true; requestAnimationFrame(draw); }
  }, (e) => showError(status, e));
  return h('div', {}, table, status);
}

// ---- pages ----------------------------------------------------------------------

let pageAbort = new AbortController();

function loginPage(message) {
  $nav.replaceChildren();
  $who.replaceChildren();
  const token = h('textarea', { id: 'token', placeholder: 'Bearer token (kubectl create token NAME)', spellcheck: 'false' });
  const err = h('div');
  if (message) showError(err, new Error(message));
  const signIn = async (mode) => {
    session.signOut();
    if (mode === 'token') sessionStorage.setItem('baton.token', token.value.trim());
    else sessionStorage.setItem('baton.mode', 'cert');
    try {
      await whoAmI(false);
      location.hash = '#/';
    } catch (e) {
      session.signOut();
      showError(err, e.status === 401 ? new Error('Those credentials were not accepted.') : e);
    }
  };
  $main.replaceChildren(h('div', { class: 'login card' },
    h('h1', {}, 'Sign in to Baton'),
    h('p', { class: 'muted' }, 'Use a bearer token, or the client certificate of your kubeconfig imported into this browser. Everything you see and do is checked by the API with your own rights.'),
    token,
    h('div', { class: 'actions' },
      h('button', { class: 'primary', id: 'signin', onclick: () => signIn('token') }, 'Sign in with token'),
      h('button', { id: 'signin-cert', onclick: () => signIn('cert') }, 'Use client certificate')),
    err));
}

async function whoAmI(toLogin = true) {
  const review = await api('/apis/authentication.k8s.io/v1/selfsubjectreviews', {
    method: 'POST', contentType: 'application/json', toLogin,
    body: JSON.stringify({ apiVersion: 'authentication.k8s.io/v1', kind: 'SelfSubjectReview' }),
  });
  return review.status.userInfo;
}

async function drawChrome() {
  const nsSelect = h('select', { id: 'namespace', 'aria-label': 'Namespace', onchange: (e) => { session.namespace = e.target.value; route(); } },
    h('option', { value: '' }, 'all namespaces'));
  $nav.replaceChildren(
    h('a', { href: '#/' }, 'Overview'),
    ...['deployments', 'pods', 'services', 'ingresses', 'jobs'].map((p) => h('a', { href: listHash(KINDS[p]) }, p[0].toUpperCase() + p.slice(1))),
    h('a', { href: '#/crds' }, 'Custom resources'),
    nsSelect);
  api('/api/v1/namespaces').then((list) => {
    for (const n of list.items) nsSelect.append(h('option', { value: n.metadata.name, selected: n.metadata.name === session.namespace }, n.metadata.name));
  }).catch(() => {
    if (session.namespace) nsSelect.append(h('option', { value: session.namespace, selected: true }, session.namespace));
  });
  try {
    const user = await whoAmI();
    $who.replaceChildren(h('span', { id: 'username' }, user.username), h('button', { onclick: () => { session.signOut(); location.hash = '#/login'; } }, 'Sign out'));
  } catch { /* a 401 has sent us to the login page */ }
}

function overviewPage(signal) {
  const nodes = h('div');
  const workloads = h('tbody');
  const wlStatus = h('div');
  $main.replaceChildren(
    h('h1', {}, 'Overview'),
    h('h2', {}, 'Nodes'), nodes,
    h('h2', {}, 'Workloads by namespace'),
    h('table', { id: 'workloads' }, h('thead', {}, h('tr', {}, h('th', {}, 'Namespace'), h('th', {}, 'Deployments'), h('th', {}, 'Pods ready'), h('th', {}, 'Pods'))), workloads),
    wlStatus);
  every(5000, signal, async () => {
    try {
      const [list, usage] = await Promise.all([
        api('/api/v1/nodes', { signal }),
        api('/apis/metrics.k8s.io/v1beta1/nodes', { signal }).catch(() => ({ items: [] })),
      ]);
      const use = new Map(usage.items.map((m) => [m.metadata.name, m.usage]));
      nodes.replaceChildren(h('table', { id: 'nodes' },
        h('thead', {}, h('tr', {}, ['Name', 'Status', 'CPU used', 'CPU capacity', 'Memory used', 'Memory capacity', 'Pods capacity'].map((t) => h('th', {}, t)))),
        h('tbody', {}, list.items.map((n) => {
          const ready = (n.status?.conditions || []).find((c) => c.type === 'Ready')?.status === 'True' ? 'Ready' : 'NotReady';
          const u = use.get(n.metadata.name) || {};
          const cap = n.status?.capacity || {};
          return h('tr', {}, h('td', {}, h('a', { href: objectHash(KINDS.nodes, '', n.metadata.name) }, n.metadata.name)), h('td', { class: statusClass(ready) }, ready),
            h('td', { class: 'num' }, cores(quantity(u.cpu))), h('td', { class: 'num' }, cores(quantity(cap.cpu))),
            h('td', { class: 'num' }, bytes(quantity(u.memory))), h('td', { class: 'num' }, bytes(quantity(cap.memory))),
            h('td', { class: 'num' }, cap.pods || ''));
        }))));
    } catch (e) { showError(nodes, e); throw e; }
  });
  const ns = session.namespace;
  let deployments = new Map();
  let pods = new Map();
  const draw = () => {
    const by = new Map();
    const row = (n) => by.get(n) || by.set(n, { d: 0, ready: 0, pods: 0 }).get(n);
    for (const d of deployments.values()) row(d.metadata.namespace).d++;
    for (const p of pods.values()) {
      const r = row(p.metadata.namespace);
      r.pods++;
      if ((p.status?.conditions || []).some((c) => c.type === 'Ready' && c.status === 'True')) r.ready++;
    }
    workloads.replaceChildren(...[...by.entries()].sort().map(([n, r]) => h('tr', { 'data-namespace': n },
      h('td', {}, n), h('td', { class: 'num' }, r.d), h('td', { class: 'num' }, r.ready), h('td', { class: 'num' }, r.pods))));
  };
  watchList(collectionPath(KINDS.deployments, ns), signal, (m) => { deployments = m; draw(); }, (e) => showError(wlStatus, e));
  watchList(collectionPath(KINDS.pods, ns), signal, (m) => { pods = m; draw(); }, (e) => showError(wlStatus, e));
}

function listPage(r, signal) {
  const ns = r.namespaced ? session.namespace : '';
  $main.replaceChildren(h('h1', {}, r.kind === r.plural ? r.plural : `${r.kind}s`, ns ? h('span', { class: 'muted' }, ` in ${ns}`) : ''),
    liveTable(r, { ns }, signal));
}

async function crdsPage(signal) {
  const body = h('div');
  $main.replaceChildren(h('h1', {}, 'Custom resources'), body);
  try {
    const list = await api('/apis/apiextensions.k8s.io/v1/customresourcedefinitions', { signal });
    if (!list.items.length) { body.replaceChildren(h('p', { class: 'muted' }, 'No CustomResourceDefinitions.')); return; }
    body.replaceChildren(h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, 'Kind'), h('th', {}, 'Group'), h('th', {}, 'Scope'))),
      h('tbody', {}, list.items.map((c) => {
        const v = (c.spec.versions.find((x) => x.storage) || c.spec.versions[0]).name;
        const r = { group: c.spec.group, version: v, plural: c.spec.names.plural };
        return h('tr', {}, h('td', {}, h('a', { href: listHash(r) }, c.spec.names.kind)), h('td', {}, c.spec.group), h('td', {}, c.spec.scope));
      }))));
  } catch (e) { showError(body, e); }
}

// A small line chart of the last samples.
function chart(label, format) {
  const samples = [];
  const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('class', 'chart');
  svg.setAttribute('viewBox', '0 0 120 40');
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.append(line);
  const now = h('span', {}, '–');
  const el = h('div', { class: 'chartbox', 'data-chart': label }, h('div', { class: 'label' }, h('span', {}, label), now), svg);
  return {
    el,
    push(v) {
      if (isNaN(v)) return;
      samples.push(v);
      if (samples.length > 60) samples.shift();
      const max = Math.max(...samples) || 1;
      line.setAttribute('points', samples.map((s, i) => `${(i * 120) / 59},${38 - (s / max) * 36}`).join(' '));
      now.textContent = format(v);
    },
  };
}

// The node's own figures for a Wasm pod, from its metrics through the API's node proxy.
function parseMetrics(text, ns, pod) {
  const out = [];
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || !line.includes(`pod="${pod}"`) || !line.includes(`namespace="${ns}"`)) continue;
    const m = /^([a-z_]+)\{(.*)\} (\S+)$/.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries([...m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
    out.push({ name: m[1], labels, value: parseFloat(m[3]) });
  }
  return out;
}

async function objectActions(r, o, signal, onChanged) {
  const ns = o.metadata.namespace || '';
  const name = o.metadata.name;
  const path = objectPath(r, ns, name);
  const bar = h('div', { class: 'actions', id: 'object-actions' });
  const [patch, del, scale] = await Promise.all([can('patch', r, ns, '', name), can('delete', r, ns, '', name),
    r.scale ? can('patch', r, ns, 'scale', name) : false]);
  if (signal.aborted) return bar;
  // Asked and answered: a test (or a reader of the DOM) can tell "no rights" from "not yet".
  bar.dataset.checked = 'true';
  const out = h('div');
  const act = async (what, f) => {
    try { await f(); onChanged?.(what); } catch (e) { showError(out, e); }
  };
  if (scale) {
    bar.append(h('button', { 'data-action': 'scale', onclick: async () => {
      const input = h('input', { type: 'number', min: '0', value: o.spec.replicas ?? 1, id: 'replicas', 'aria-label': 'Replicas' });
      if (!(await confirmAction(`Scale ${r.kind} ${name} to how many replicas?`, input))) return;
      await act('scaled', () => api(`${path}/scale`, { method: 'PATCH', contentType: 'application/merge-patch+json', body: JSON.stringify({ spec: { replicas: Number(input.value) } }) }));
    } }, 'Scale'));
  }
  if (r.restart && patch) {
    bar.append(h('button', { 'data-action': 'restart', onclick: async () => {
      if (!(await confirmAction(`Restart every pod of ${r.kind} ${name}, one rollout?`))) return;
      const body = { spec: { template: { metadata: { annotations: { 'kubectl.kubernetes.io/restartedAt': new Date().toISOString() } } } } };
      await act('restarted', () => api(path, { method: 'PATCH', contentType: 'application/merge-patch+json', body: JSON.stringify(body) }));
    } }, 'Restart'));
  }
  if (patch) bar.append(h('button', { 'data-action': 'edit', onclick: () => editYaml(r, path, out, onChanged) }, 'Edit YAML'));
  if (del) {
    bar.append(h('button', { class: 'danger', 'data-action': 'delete', onclick: async () => {
      if (!(await confirmAction(`Delete ${r.kind} ${ns ? ns + '/' : ''}${name}?`))) return;
      await act('deleted', async () => { await api(path, { method: 'DELETE' }); location.hash = listHash(r); });
    } }, 'Delete'));
  }
  return h('div', {}, bar, out);
}

// Server-side apply of the edited YAML, as `kubectl apply --server-side` does.
async function editYaml(r, path, out, onChanged) {
  try {
    const o = await api(path);
    // resourceVersion stays: a change made by someone else since this was read makes the
    // apply fail with a conflict instead of being overwritten.
    for (const k of ['managedFields', 'uid', 'creationTimestamp', 'generation']) delete o.metadata[k];
    delete o.status;
    const area = h('textarea', { class: 'yaml', spellcheck: 'false', id: 'yaml-editor' }, toYaml(o));
    const err = h('div');
    out.replaceChildren(area, h('div', { class: 'actions' },
      h('button', { class: 'primary', 'data-action': 'apply', onclick: async () => {
        if (!(await confirmAction(`Apply your changes to ${o.kind} ${o.metadata.name}?`))) return;
        try {
          await api(`${path}?fieldManager=baton-dashboard&force=true`, { method: 'PATCH', contentType: 'application/apply-patch+yaml', body: area.value });
          out.replaceChildren(h('p', { class: 'ok' }, 'Applied.'));
          onChanged?.('applied');
        } catch (e) { showError(err, e); }
      } }, 'Apply'),
      h('button', { onclick: () => out.replaceChildren() }, 'Cancel')), err);
  } catch (e) { showError(out, e); }
}

function kv(pairs) {
  return h('dl', { class: 'kv' }, pairs.filter(([, v]) => v !== undefined && v !== '').flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

function conditionsTable(conds) {
  return h('table', { class: 'conditions' }, h('thead', {}, h('tr', {}, ['Type', 'Status', 'Reason', 'Message', 'Since'].map((t) => h('th', {}, t)))),
    h('tbody', {}, (conds || []).map((c) => h('tr', { 'data-condition': c.type }, h('td', {}, c.type), h('td', { class: statusClass(c.status) }, c.status),
      h('td', {}, c.reason || ''), h('td', {}, c.message || ''), h('td', {}, age(c.lastTransitionTime))))));
}

function eventsOf(o, signal) {
  const ns = o.metadata.namespace;
  return liveTable(KINDS.events, {
    ns,
    fieldSelector: `involvedObject.name=${o.metadata.name},involvedObject.kind=${o.kind}`,
    sort: (a, b) => Date.parse(a.lastTimestamp || a.metadata.creationTimestamp) - Date.parse(b.lastTimestamp || b.metadata.creationTimestamp),
  }, signal);
}

const MAX_LOG_LINES = 5000;

function logsPanel(pod, signal) {
  const names = pod.spec.containers.map((c) => c.name);
  const pre = h('pre', { class: 'logs', id: 'logs' });
  const err = h('div');
  let inner = new AbortController();
  const follow = (container) => {
    if (signal.aborted) return;
    inner.abort();
    inner = new AbortController();
    signal.addEventListener('abort', () => inner.abort(), { once: true });
    pre.textContent = '';
    const q = new URLSearchParams({ follow: 'true', tailLines: '500', container });
    const path = `${objectPath(KINDS.pods, pod.metadata.namespace, pod.metadata.name)}/log?${q}`;
    // Lines arrive one by one; they are drawn once a frame, a text node per batch, and
    // the oldest batches go once more than MAX_LOG_LINES are shown.
    let pending = [];
    const batches = [];
    let shown = 0;
    const mine = inner.signal;
    const flush = () => {
      if (mine.aborted || !pending.length) return;
      const node = document.createTextNode(pending.join(''));
      batches.push(pending.length);
      shown += pending.length;
      pending = [];
      pre.append(node);
      while (shown > MAX_LOG_LINES && batches.length > 1) {
        shown -= batches.shift();
        pre.firstChild.remove();
      }
      pre.scrollTop = pre.scrollHeight;
    };
    streamLines(path, inner.signal, (line) => {
      if (!pending.length) requestAnimationFrame(flush);
      pending.push(line + '\n');
    }).catch((e) => { if (!inner.signal.aborted) showError(err, e); });
  };
  const select = h('select', { 'aria-label': 'Container', onchange: (e) => follow(e.target.value) }, names.map((n) => h('option', { value: n }, n)));
  follow(names[0]);
  return h('div', {}, h('div', { class: 'actions' }, 'Container ', select, h('span', { class: 'muted' }, 'following')), pre, err);
}

function podPanels(pod, signal) {
  const ns = pod.metadata.namespace;
  const name = pod.metadata.name;
  const cpu = chart('CPU', cores);
  const mem = chart('Memory', bytes);
  const rps = chart('Requests/s', (v) => v.toFixed(1));
  const wasm = h('div', { id: 'wasm' }, h('p', { class: 'muted' }, 'Reading the node…'));
  every(5000, signal, async () => {
    const m = await api(`/apis/metrics.k8s.io/v1beta1/namespaces/${enc(ns)}/pods/${enc(name)}`, { signal });
    cpu.push(m.containers.reduce((s, c) => s + quantity(c.usage.cpu), 0));
    mem.push(m.containers.reduce((s, c) => s + quantity(c.usage.memory), 0));
  });
  let last;
  if (pod.spec.nodeName) {
    every(2000, signal, async () => {
      let text;
      try {
        text = await api(`/api/v1/nodes/${enc(pod.spec.nodeName)}/proxy/metrics`, { signal, accept: 'text/plain' });
      } catch (e) {
        wasm.replaceChildren(h('p', { class: 'muted' }, e.status === 403 ? 'Your user may not read the node\'s metrics (nodes/proxy), so the Wasm figures are hidden.' : e.message));
        throw e;
      }
      const series = parseMetrics(text, ns, name);
      const one = (n) => series.filter((s) => s.name === n);
      const info = one('baton_component_info');
      const requests = one('baton_http_requests_total').reduce((s, x) => s + x.value, 0);
      const now = performance.now();
      if (last) rps.push(Math.max(0, ((requests - last.requests) * 1000) / (now - last.at)));
      last = { requests, at: now };
      wasm.replaceChildren(
        info.length ? h('table', {}, h('thead', {}, h('tr', {}, ['Container', 'Kind', 'Exports'].map((t) => h('th', {}, t)))),
          h('tbody', {}, info.map((i) => h('tr', { 'data-container': i.labels.container }, h('td', {}, i.labels.container),
            h('td', { class: 'component-kind' }, i.labels.kind), h('td', {}, i.labels.exports.split(',').map((e) => h('span', { class: 'pill' }, e)))))))
          : h('p', { class: 'muted' }, 'No Wasm component is running in this pod.'),
        kv([['Instances alive', h('span', { id: 'instances' }, String(one('baton_sandbox_instances')[0]?.value ?? 0))],
          ['HTTP requests', h('span', { id: 'http-requests' }, String(requests))]]));
    });
  }
  return h('div', {},
    h('h2', {}, 'Usage'), h('div', { class: 'grid' }, cpu.el, mem.el, rps.el),
    h('h2', {}, 'Wasm'), wasm);
}

async function objectPage(r, ns, name, signal) {
  const path = objectPath(r, ns, name);
  const head = h('div');
  const body = h('div');
  $main.replaceChildren(h('h1', {}, `${r.kind} `, h('span', { id: 'object-name' }, ns ? `${ns}/${name}` : name)), head, body);
  let o;
  try { o = await api(path, { signal }); } catch (e) { showError(head, e); return; }
  o.kind = o.kind || r.kind;
  const actions = await objectActions(r, o, signal, () => {});
  if (signal.aborted) return;
  head.replaceChildren(actions);
  const status = h('div', { class: 'card', id: 'status' });
  const conditions = h('div');
  const drawStatus = (x) => {
    if (r.plural === 'pods') {
      status.replaceChildren(kv([['Status', h('span', { class: statusClass(podStatus(x)), id: 'pod-status' }, podStatus(x))], ['Ready', podReady(x)],
        ['Node', x.spec.nodeName], ['Pod IP', x.status?.podIP], ['Started', x.status?.startTime], ['QoS', x.status?.qosClass]]),
      h('h2', {}, 'Containers'),
      h('table', {}, h('thead', {}, h('tr', {}, ['Name', 'Image', 'State', 'Ready', 'Restarts'].map((t) => h('th', {}, t)))),
        h('tbody', {}, x.spec.containers.map((c) => {
          const s = (x.status?.containerStatuses || []).find((cs) => cs.name === c.name) || {};
          const state = Object.keys(s.state || {})[0] || 'waiting';
          return h('tr', {}, h('td', {}, c.name), h('td', {}, c.image), h('td', {}, state), h('td', {}, String(!!s.ready)), h('td', { class: 'num' }, s.restartCount || 0));
        }))));
    } else if (r.plural === 'deployments') {
      status.replaceChildren(kv([['Replicas', `${x.spec.replicas ?? 1} desired`], ['Ready', h('span', { id: 'ready-replicas' }, String(x.status?.readyReplicas || 0))],
        ['Up-to-date', String(x.status?.updatedReplicas || 0)], ['Available', String(x.status?.availableReplicas || 0)],
        ['Strategy', x.spec.strategy?.type], ['Selector', Object.entries(x.spec.selector?.matchLabels || {}).map(([k, v]) => `${k}=${v}`).join(',')]]));
    } else {
      status.replaceChildren(kv([['Kind', x.kind], ['Namespace', x.metadata.namespace], ['Created', x.metadata.creationTimestamp],
        ['Labels', Object.entries(x.metadata.labels || {}).map(([k, v]) => h('span', { class: 'pill' }, `${k}=${v}`))]]));
    }
    conditions.replaceChildren(x.status?.conditions ? h('div', {}, h('h2', {}, 'Conditions'), conditionsTable(x.status.conditions)) : '');
  };
  drawStatus(o);
  // The object itself, kept live.
  watchList(collectionPath(r, ns) + `?fieldSelector=${enc('metadata.name=' + name)}`, signal, (items) => {
    const x = [...items.values()][0];
    if (x) { x.kind = x.kind || r.kind; drawStatus(x); }
  });
  const yaml = h('pre', { class: 'yaml', id: 'yaml' });
  const parts = [status, conditions];
  if (r.plural === 'deployments') {
    const sel = Object.entries(o.spec.selector?.matchLabels || {}).map(([k, v]) => `${k}=${v}`).join(',');
    parts.push(h('h2', {}, 'Pods'), liveTable(KINDS.pods, { ns, labelSelector: sel }, signal));
  }
  if (r.plural === 'pods') parts.push(podPanels(o, signal), h('h2', {}, 'Logs'), logsPanel(o, signal));
  if (r.namespaced) parts.push(h('h2', {}, 'Events'), eventsOf(o, signal));
  parts.push(h('h2', {}, 'YAML'), yaml);
  body.replaceChildren(...parts);
  // As `kubectl get -o yaml` shows it: without the managed fields' bookkeeping.
  api(path, { signal }).then((x) => {
    delete x.metadata.managedFields;
    yaml.textContent = toYaml(x);
  }).catch((e) => showError(yaml, e));
}

// ---- routing --------------------------------------------------------------------

async function route() {
  pageAbort.abort();
  pageAbort = new AbortController();
  accessCache = new Map();
  const signal = pageAbort.signal;
  let parts;
  try {
    parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  } catch {
    parts = [];
  }
  if (!session.signedIn || parts[0] === 'login') { loginPage(); return; }
  if (!$nav.childElementCount) drawChrome();
  switch (parts[0]) {
    case 'list':
    case 'obj': {
      // Names as the API writes them, nothing that could climb out of the path.
      const name = /^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$/;
      if (![parts[2], parts[3]].every((p) => name.test(p || '')) || !(parts[1] === 'core' || name.test(parts[1] || ''))) {
        $main.replaceChildren(h('div', { class: 'error', role: 'alert' }, 'No such page.'));
        return;
      }
      const r = await resource(parts[1] === 'core' ? '' : parts[1], parts[2], parts[3]);
      if (signal.aborted) return;
      if (parts[0] === 'list') listPage(r, signal);
      else objectPage(r, parts[4] === '_' ? '' : parts[4], parts[5], signal);
      break;
    }
    case 'crds': crdsPage(signal); break;
    default: overviewPage(signal);
  }
}

window.addEventListener('hashchange', route);
route();
