// The console's first paint on loopback, for BENCHMARKS.md (not a test: timings swing).
//   node first-paint.mjs http://127.0.0.1:3000 [loads]
// Each load is a fresh browser context (no cache): the time to the first contentful paint
// and to the sign-in form, median and worst, after one load that warms the browser itself.

import {chromium} from 'playwright-core';

const base = process.argv[2] || 'http://127.0.0.1:3000';
const loads = Number(process.argv[3] || 20);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const paints = [];
const forms = [];
for (let i = 0; i <= loads; i++) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const start = Date.now();
  await page.goto(`${base}/ui/`);
  await page.waitForSelector('form.signin');
  const form = Date.now() - start;
  const paint = await page.evaluate(() => performance.getEntriesByName('first-contentful-paint')[0]?.startTime);
  if (i > 0) { paints.push(paint); forms.push(form); }
  await context.close();
}
await browser.close();
const stat = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return `median ${s[Math.floor(s.length / 2)].toFixed(0)} ms, worst ${s[s.length - 1].toFixed(0)} ms`;
};
console.log(`${loads} cold loads: first contentful paint ${stat(paints)}; sign-in form ready ${stat(forms)}`);
