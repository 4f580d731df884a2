// The web console in a real browser (Debian's Chromium through playwright-core), against a
// running `flowcore serve`. Started by tests/console.rs, which passes:
//   FLOWCORE_URL      the server, e.g. http://127.0.0.1:41234
//   FLOWCORE_KEY      an admin API key
//   FLOWCORE_LLM_URL  a stand-in OpenAI server that streams slowly
//   SCREENSHOTS       where each page's screenshot goes
//   CHROMIUM          the browser (default /usr/bin/chromium)
// Every wait is bounded; the first failure ends the script with its reason and exit code 1.

import {chromium} from 'playwright-core';
import {mkdirSync} from 'node:fs';
import {join} from 'node:path';

const base = process.env.FLOWCORE_URL;
const key = process.env.FLOWCORE_KEY;
const llm = process.env.FLOWCORE_LLM_URL;
const shots = process.env.SCREENSHOTS || 'screenshots';
const WAIT = 15_000;
mkdirSync(shots, {recursive: true});

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

async function api(method, path, body) {
  const r = await fetch(`${base}/api/v1${path}`, {
    method,
    headers: {'x-api-key': key, 'content-type': 'application/json'},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

async function runUntil(runId, statuses) {
  for (let i = 0; i < 150; i++) {
    const run = await api('GET', `/runs/${runId}`);
    if (statuses.includes(run.status)) return run;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`run ${runId} never reached ${statuses}`);
}

// ---- the flows a user would have
const XSS = '<img src=x onerror="window.__xss=1">';
await api('POST', '/flows', {
  id: 'greet', name: 'Greeting',
  description: 'Says hello, then takes one branch or the other.',
  nodes: [
    {id: 'hello', type: 'set', params: {fields: {greeting: 'hello {{ input.name }}'}}},
    {id: 'big', type: 'branch', params: {condition: 'input.n > 5'}},
    {id: 'a', type: 'set', params: {fields: {path: 'a', msg: '{{ nodes.hello.greeting }}'}}},
    {id: 'b', type: 'set', params: {fields: {path: 'b'}}},
  ],
  edges: [{from: 'hello', to: 'big'}, {from: 'big', port: 'true', to: 'a'}, {from: 'big', port: 'false', to: 'b'}],
  triggers: [{type: 'webhook', path: 'greet', mode: 'sync'}],
});
await api('POST', '/flows', {
  id: 'slow', name: 'Three slow steps',
  nodes: [
    {id: 'fetch', type: 'delay', params: {ms: 700}},
    {id: 'enrich', type: 'delay', params: {ms: 700}},
    {id: 'store', type: 'set', params: {fields: {done: true}}},
  ],
  edges: [{from: 'fetch', to: 'enrich'}, {from: 'enrich', to: 'store'}],
});
const flaky = (fixed) => ({
  id: 'flaky', name: 'Invoice sync',
  nodes: [
    {id: 'load', type: 'set', params: {fields: {amount: 42}}},
    {id: 'post', type: 'script', params: {source: fixed ? 'nodes.load.amount * 2' : 'throw "the ledger refused the invoice"'}},
    {id: 'notify', type: 'set', params: {fields: {sent: '{{ nodes.post }}'}}},
  ],
  edges: [{from: 'load', to: 'post'}, {from: 'post', to: 'notify'}],
});
await api('POST', '/flows', flaky(false));
const failed = await api('POST', '/flows/flaky/runs', {input: {}, wait: true});
check(failed.status === 'failed', 'the first version of flaky fails');
await api('PUT', '/flows/flaky', flaky(true));
await api('POST', '/flows', {
  id: 'approval', name: 'Refund approval',
  nodes: [
    {id: 'ask', type: 'set', params: {fields: {amount: '{{ input.amount }}'}}},
    {id: 'approve', type: 'wait', params: {signal: 'approval'}},
    {id: 'pay', type: 'set', params: {fields: {approved: '{{ nodes.approve.approved }}'}}},
  ],
  edges: [{from: 'ask', to: 'approve'}, {from: 'approve', to: 'pay'}],
});
const waiting = await api('POST', '/flows/approval/runs', {input: {amount: 120}, wait: false});
await runUntil(waiting.run_id, ['waiting']);
await api('POST', '/flows', {
  id: 'xss', name: XSS,
  nodes: [{id: 'echo', type: 'set', params: {fields: {html: '<script>window.__xss=2</script>'}}}],
});
const xssRun = await api('POST', '/flows/xss/runs', {input: {note: '<b>bold</b>'}, wait: true});
await api('POST', '/flows', {
  id: 'ask', name: 'Ask a model',
  nodes: [
    {id: 'think', type: 'delay', params: {ms: 900}},
    {id: 'answer', type: 'llm_chat', params: {
      base_url: llm, model: 'fake-1',
      messages: [{role: 'user', content: 'Say hello to {{ input.name }}'}],
    }},
  ],
  edges: [{from: 'think', to: 'answer'}],
});
for (let i = 0; i < 3; i++) await api('POST', '/flows/greet/runs', {input: {name: `user${i}`, n: i * 4}, wait: true});

// ---- the browser
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const problems = [];
try {
  const context = await browser.newContext({viewport: {width: 1360, height: 900}});
  const page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // An API error answer (401 for the wrong key, 400 from the editor's check) is logged by
    // the browser as a failed load: expected. Anything else, a CSP violation first, is not.
    if (m.type() === 'error' && !/^Failed to load resource/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  page.on('dialog', (d) => { problems.push(`dialog: ${d.message()}`); d.dismiss(); });
  const shot = async (name) => page.screenshot({path: join(shots, `${name}.png`), fullPage: true});

  // Sign in: the root redirects to the console; a wrong key is refused; the key never
  // appears in a URL.
  const started = Date.now();
  await page.goto(`${base}/`);
  await page.waitForSelector('form.signin', {timeout: WAIT});
  const paint = await page.evaluate(() => performance.getEntriesByName('first-contentful-paint')[0]?.startTime);
  console.log(`# first contentful paint ${paint?.toFixed(0)} ms; sign-in form after ${Date.now() - started} ms`);
  check(page.url().endsWith('/ui/'), 'GET / redirects to /ui/');
  await shot('signin');
  await page.fill('#key', 'fc_wrong');
  await page.click('form.signin button');
  await page.waitForSelector('form.signin .error:not(:empty)', {timeout: WAIT});
  check((await page.textContent('form.signin .error')).includes('not valid'), 'a wrong key is refused');
  await page.fill('#key', key);
  await page.click('form.signin button');
  await page.waitForSelector('table.list', {timeout: WAIT});
  check(!page.url().includes(key), 'the key is not in the URL');

  // The flows list, with a flow whose name is HTML: it shows as text.
  await page.waitForSelector('a[href="#/flows/xss"]', {timeout: WAIT});
  check((await page.textContent('a[href="#/flows/xss"]')) === XSS, 'a flow name holding HTML shows as text');
  await page.waitForFunction(() => ![...document.querySelectorAll('table.list td')].some((td) => td.textContent === '…'),
    null, {timeout: WAIT});
  check((await page.textContent('a[href="#/flows/flaky"]').catch(() => '')) === 'Invoice sync', 'flows are listed by name');
  await shot('flows');

  // A flow's DAG: four nodes, the branch's ports on its edges; a node's definition on click
  // and by keyboard.
  await page.click('a[href="#/flows/greet"]');
  await page.waitForSelector('svg.dag g.node', {timeout: WAIT});
  check((await page.locator('svg.dag g.node').count()) === 4, 'the DAG draws four nodes');
  const ports = await page.locator('svg.dag text.port').allTextContents();
  check(ports.includes('true') && ports.includes('false'), 'branch ports label their edges');
  await page.focus('svg.dag g.node[data-node="hello"]');
  await page.keyboard.press('Enter');
  await page.waitForSelector('aside.detail h2', {timeout: WAIT});
  check((await page.textContent('aside.detail')).includes('hello {{ input.name }}'), 'Enter on a node shows its params');
  await shot('flow');

  // The editor: checked by the server as you type, each problem on its node.
  await page.click('nav.tabs a:text("Edit")');
  await page.waitForSelector('textarea.editor', {timeout: WAIT});
  const broken = {
    id: 'greet', nodes: [
      {id: 'hello', type: 'set', params: {fields: {g: 'hi'}}},
      {id: 'oops', type: 'no_such_type'},
      {id: 'calc', type: 'branch', params: {condition: 'input.n >'}},
    ],
    edges: [{from: 'hello', to: 'calc'}, {from: 'calc', port: 'true', to: 'oops'}, {from: 'hello', to: 'ghost'}],
  };
  await page.fill('textarea.editor', JSON.stringify(broken, null, 2));
  await page.waitForSelector('svg.dag g.node.problem[data-node="oops"]', {timeout: WAIT});
  const listed = await page.locator('.problems li').allTextContents();
  check(listed.length >= 3, `every problem is listed (${listed.length})`);
  check(await page.locator('svg.dag g.node.problem[data-node="calc"]').count() === 1, 'a bad expression marks its node');
  await shot('editor');
  await page.fill('textarea.editor', JSON.stringify({...broken, nodes: broken.nodes.slice(0, 1), edges: []}, null, 2));
  await page.waitForSelector('.problems .ok', {timeout: WAIT});
  check(true, 'a fixed flow compiles');

  // Versions and their differences.
  await page.goto(`${base}/ui/#/flows/flaky?tab=versions`);
  await page.waitForSelector('pre.diff .add', {timeout: WAIT});
  const added = await page.locator('pre.diff .add').allTextContents();
  check(added.some((l) => l.includes('nodes.load.amount * 2')), 'the diff shows the changed script');
  await shot('versions');

  // Start a run from the console and watch its steps turn green live.
  await page.goto(`${base}/ui/#/flows/slow?tab=run`);
  await page.click('form.card button[type=submit]');
  await page.waitForSelector('svg.dag g.node.s-running', {timeout: WAIT});
  check(true, 'a step shows running while it runs');
  await shot('run-live');
  await page.waitForSelector('svg.dag g.node[data-node="store"].s-succeeded', {timeout: WAIT});
  await page.waitForSelector('.bar .badge.s-succeeded', {timeout: WAIT});
  check(await page.locator('svg.dag g.node.s-succeeded').count() === 3, 'every step turned green without a reload');
  const bars = await page.waitForFunction(() => document.querySelectorAll('ol.gantt li').length === 3, null, {timeout: WAIT})
    .then(() => 3, async () => page.locator('ol.gantt li').count());
  check(bars === 3, `the timeline has a bar per step (${bars})`);
  await shot('run-succeeded');

  // A failed run: its error on its step, then a rerun on the fixed version.
  await page.goto(`${base}/ui/#/runs/${failed.run_id}`);
  await page.waitForSelector('svg.dag g.node[data-node="post"].s-failed', {timeout: WAIT});
  await page.click('svg.dag g.node[data-node="post"]');
  await page.waitForSelector('aside.detail pre.error', {timeout: WAIT});
  check((await page.textContent('aside.detail pre.error')).includes('ledger refused'), 'the failed step shows its error');
  await shot('run-failed');
  await page.selectOption('select[aria-label="version to rerun"]', 'latest');
  await page.click('button:text("Rerun failed steps")');
  await page.waitForFunction((id) => location.hash.startsWith('#/runs/') && !location.hash.includes(id), failed.run_id, {timeout: WAIT});
  await page.waitForSelector('.bar .badge.s-succeeded', {timeout: WAIT});
  check((await page.textContent('dl.facts')).includes(failed.run_id), 'the rerun links the run it reruns');
  await page.click('svg.dag g.node[data-node="load"]');
  await page.waitForSelector('aside.detail', {timeout: WAIT});
  check((await page.textContent('aside.detail')).includes('kept from the run this one reruns'), 'an unchanged step is reused');
  await shot('rerun');

  // A waiting run: approve it from its page.
  await page.goto(`${base}/ui/#/runs/${waiting.run_id}`);
  await page.waitForSelector('form.signal', {timeout: WAIT});
  await shot('waiting');
  await page.fill('form.signal textarea', '{"approved": "yes, by the console"}');
  await page.click('form.signal button[type=submit]');
  await page.waitForSelector('.bar .badge.s-succeeded', {timeout: WAIT});
  const approved = await runUntil(waiting.run_id, ['succeeded']);
  check(approved.output?.approved === 'yes, by the console', `the signal reached the wait node (${JSON.stringify(approved.output)})`);

  // Run data holding a script shows as text and never runs.
  await page.goto(`${base}/ui/#/runs/${xssRun.run_id}`);
  await page.click('svg.dag g.node[data-node="echo"]');
  await page.waitForSelector('aside.detail pre.json', {timeout: WAIT});
  check((await page.textContent('aside.detail pre.json')).includes('<script>window.__xss=2</script>'), 'an output holding <script> shows as text');
  check((await page.textContent('.io')).includes('<b>bold</b>'), 'an input holding HTML shows as text');
  check(await page.evaluate(() => window.__xss) === undefined, 'no script from run data ran');
  check(await page.locator('main script, main img, main b').count() === 0, 'no element was made from run data');
  await shot('xss');

  // An LLM step's tokens as they stream.
  const asked = await api('POST', '/flows/ask/runs', {input: {name: 'Ada'}, wait: false});
  await page.goto(`${base}/ui/#/runs/${asked.run_id}?node=answer`);
  await page.waitForSelector('aside.detail pre.tokens', {timeout: WAIT});
  const partial = await page.textContent('aside.detail pre.tokens');
  const streaming = await api('GET', `/runs/${asked.run_id}`);
  check(streaming.status === 'running' && partial.length > 0, `tokens show while the step runs ("${partial}")`);
  await shot('tokens');
  await page.waitForSelector('.bar .badge.s-succeeded', {timeout: WAIT});
  check((await page.textContent('aside.detail')).includes('Hello, Ada! How can I help today?'), 'the whole answer streamed');

  // The runs list, filtered.
  await page.goto(`${base}/ui/#/runs?status=failed`);
  await page.waitForSelector('table.list tbody tr', {timeout: WAIT});
  const statuses = await page.locator('table.list tbody .badge').allTextContents();
  check(statuses.length >= 1 && statuses.every((st) => st === 'failed'), 'the status filter keeps failed runs only');
  await page.goto(`${base}/ui/#/runs?flow_id=greet`);
  await page.waitForSelector('table.list tbody tr', {timeout: WAIT});
  check(await page.locator('table.list tbody tr').count() === 3, 'the flow filter keeps its runs');
  await page.fill('input[name="created_after"]', '2001-01-01T00:00');
  await page.fill('input[name="created_before"]', '2001-01-02T00:00');
  await page.click('form.filters button[type=submit]');
  await page.waitForSelector('.card.empty', {timeout: WAIT});
  check(true, 'a time window with no run shows none');
  await page.goto(`${base}/ui/#/runs`);
  await page.waitForSelector('table.list tbody tr', {timeout: WAIT});
  await shot('runs');

  // Usage as charts.
  await page.goto(`${base}/ui/#/usage`);
  await page.waitForSelector('svg.chart rect.bar:not([height="0"])', {timeout: WAIT});
  check((await page.textContent('.charts')).includes('Runs'), 'usage draws its charts');
  await shot('usage');

  // Dark mode.
  await page.emulateMedia({colorScheme: 'dark'});
  await page.goto(`${base}/ui/#/runs/${failed.run_id}`);
  await page.waitForSelector('svg.dag g.node.s-failed', {timeout: WAIT});
  const bg = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  check(bg !== 'rgb(247, 248, 250)', `dark mode changes the page (${bg})`);
  await shot('run-dark');

  // Signing out forgets the key.
  await page.click('#signout');
  await page.waitForSelector('form.signin', {timeout: WAIT});
  check(await page.evaluate(() => sessionStorage.length) === 0, 'signing out forgets the key');
} finally {
  await browser.close();
}
if (problems.length) {
  console.error(problems.join('\n'));
  process.exit(1);
}
console.log('# the console passed');
