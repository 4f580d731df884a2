// The console's shell: sign-in, the routes (`#/flows`, `#/flows/{id}`, `#/runs`,
// `#/runs/{id}`, `#/usage`) and the page each one draws into <main>.

import {session, get, ApiError} from './api.js';
import {h, fill} from './dom.js';
import {flowsPage, flowPage} from './flows.js';
import {runsPage, runPage} from './runs.js';
import {usagePage} from './usage.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const signout = document.getElementById('signout');

// Each page gets an AbortSignal: leaving the page stops its live streams and timers.
let leaving = new AbortController();

function signInPage(message) {
  nav.hidden = true;
  signout.hidden = true;
  const input = h('input', {
    id: 'key', type: 'password', name: 'key', autocomplete: 'off',
    required: true, spellcheck: 'false', placeholder: 'fc_…',
  });
  const error = h('p', {class: 'error', role: 'alert'}, message || '');
  const form = h('form', {class: 'signin card', onsubmit: async (e) => {
    e.preventDefault();
    session.signIn(input.value.trim());
    try {
      await get('/flows?limit=1');
      if (!location.hash || location.hash === '#/signin') location.hash = '#/flows';
      else show();
    } catch (err) {
      session.signOut();
      // A 401 draws this page again with its message (below); anything else is said here.
      if (err.status !== 401) fill(error, err.message);
    }
  }},
  h('h1', {}, 'Sign in'),
  h('p', {class: 'muted'},
    'With an API key: FLOWCORE_ADMIN_KEY, or one made by `flowcore api-key create`. ',
    'It stays in this tab only.'),
  h('label', {for: 'key'}, 'API key'), input, error,
  h('button', {type: 'submit'}, 'Sign in'));
  fill(main, form);
  input.focus();
}

const routes = [
  [/^#\/new-flow$/, (m, q, sig) => flowPage(main, null, q, sig), 'flows'],
  [/^#\/flows\/([^/?]+)$/, (m, q, sig) => flowPage(main, decodeURIComponent(m[1]), q, sig), 'flows'],
  [/^#\/flows$/, (m, q, sig) => flowsPage(main, q, sig), 'flows'],
  [/^#\/runs\/([^/?]+)$/, (m, q, sig) => runPage(main, decodeURIComponent(m[1]), q, sig), 'runs'],
  [/^#\/runs$/, (m, q, sig) => runsPage(main, q, sig), 'runs'],
  [/^#\/usage$/, (m, q, sig) => usagePage(main, q, sig), 'usage'],
];

async function show() {
  leaving.abort();
  leaving = new AbortController();
  if (!session.key()) return signInPage();
  nav.hidden = false;
  signout.hidden = false;
  const [path, query] = (location.hash || '#/flows').split('?');
  const q = new URLSearchParams(query || '');
  const found = routes.find(([re]) => re.test(path));
  if (!found) { location.replace('#/flows'); return; }
  const [re, page, section] = found;
  for (const a of nav.querySelectorAll('a')) {
    if (a.dataset.section === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  try {
    await page(path.match(re), q, leaving.signal);
  } catch (err) {
    if (err.name === 'AbortError') return;
    if (err instanceof ApiError && err.status === 401) return;
    fill(main, h('div', {class: 'card error', role: 'alert'},
      h('h1', {}, err.status === 404 ? 'Not found' : 'Something went wrong'),
      h('p', {}, err.message), err.code ? h('p', {class: 'muted'}, `code: ${err.code}`) : null));
  }
  main.focus({preventScroll: true});
}

window.addEventListener('flowcore:unauthorized', (e) => {
  if (!session.key() || e.detail !== session.key()) return;
  leaving.abort();
  session.signOut();
  signInPage('That API key is not valid, or no longer: sign in with another.');
});
signout.addEventListener('click', () => { session.signOut(); show(); });
window.addEventListener('hashchange', show);
show();
