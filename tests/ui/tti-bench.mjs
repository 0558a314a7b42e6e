// Time to interactive of Baton's dashboard, in Debian's headless Chromium: run by
// `ui-bench` (bench/src/bin/ui_bench.rs) against a cluster holding PODS running pods.
// Prints a Markdown table: per view, the median and the worst of RUNS fresh page loads.

import { chromium } from 'playwright-core';

const URL = process.env.BATON_URL;
const TOKEN = process.env.TOKEN;
const PODS = Number(process.env.PODS);
const RUNS = Number(process.env.RUNS || 5);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 860 } });
await context.addInitScript((token) => sessionStorage.setItem('baton.token', token), TOKEN);

const views = [
  ['pod list', '#/list/core/v1/pods',
    (n) => document.querySelectorAll('table[data-resource="pods"] tbody tr').length === n],
  ['overview', '#/',
    (n) => document.querySelector('#workloads tr[data-namespace="default"] td:nth-child(4)')?.textContent === String(n)
      && document.querySelectorAll('#nodes tbody tr').length > 0],
];

console.log('| view | median ms | worst ms | first load KiB (transferred) |');
console.log('|---|---|---|---|');
for (const [name, hash, ready] of views) {
  const times = [];
  let kib = 0;
  for (let i = 0; i < RUNS + 1; i++) {
    const page = await context.newPage();
    await page.goto(`${URL}/ui/${hash}`, { waitUntil: 'commit' });
    await page.waitForFunction(ready, PODS, { polling: 'raf', timeout: 60_000 });
    // Interactive: the table is drawn and the main thread is free for the next task.
    const at = await page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => setTimeout(() => resolve(performance.now()), 0))));
    kib = await page.evaluate(() => performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))
      .filter((e) => e.name.includes('/ui/')).reduce((s, e) => s + (e.transferSize || 0), 0) / 1024);
    // The first load warms the browser's connection and the server's caches.
    if (i > 0) times.push(at);
    await page.close();
  }
  times.sort((a, b) => a - b);
  const median = times[Math.floor(times.length / 2)];
  console.log(`| ${name} | ${median.toFixed(0)} | ${times[times.length - 1].toFixed(0)} | ${kib.toFixed(1)} |`);
}
await browser.close();
