// Usage: runs, node executions and tokens per day, as bar charts (one flow or all), and the
// table by flow and day that /api/v1/usage answers.

import {get} from './api.js';
import {h, s, fill, route} from './dom.js';

const METRICS = [
  ['runs', 'Runs'],
  ['node_executions', 'Node executions'],
  ['tokens', 'LLM tokens'],
];

function days(from, to) {
  const out = [];
  for (let d = new Date(`${from}T00:00:00Z`); d <= new Date(`${to}T00:00:00Z`); d.setUTCDate(d.getUTCDate() + 1)) {
    out.push(d.toISOString().slice(0, 10));
  }
  return out;
}

const SERIES = 6; // flows drawn apart; the rest are summed as "others"

/** A bar per day, stacked by flow: `days` [day], `stacks` [{name, values: [per day]}]. */
function chart(label, days, stacks) {
  const w = 640;
  const hgt = 150;
  const totals = days.map((_, i) => stacks.reduce((t, st) => t + st.values[i], 0));
  const total = totals.reduce((t, v) => t + v, 0);
  const max = Math.max(1, ...totals);
  const bw = w / Math.max(1, days.length);
  const svg = s('svg', {class: 'chart', viewBox: `0 0 ${w} ${hgt + 22}`, role: 'img',
    'aria-label': `${label} per day, ${total} in all`});
  svg.append(s('line', {x1: 0, x2: w, y1: hgt, y2: hgt, class: 'axis'}));
  days.forEach((day, i) => {
    let y = hgt;
    stacks.forEach((st, k) => {
      const v = st.values[i];
      const bh = (v / max) * (hgt - 8);
      y -= bh;
      svg.append(s('rect', {x: i * bw + 1, y, width: Math.max(1, bw - 2), height: bh, class: `bar c${k}`},
        s('title', {}, `${day} · ${st.name}: ${v.toLocaleString()}`)));
    });
  });
  const ticks = [0, Math.floor(days.length / 2), days.length - 1].filter((i, k, a) => days[i] && a.indexOf(i) === k);
  for (const i of ticks) svg.append(s('text', {x: Math.min(w - 70, i * bw), y: hgt + 16, class: 'tick'}, days[i]));
  svg.append(s('text', {x: 4, y: 12, class: 'tick'}, `max ${max.toLocaleString()} a day`));
  return h('figure', {class: 'card'}, h('figcaption', {}, h('strong', {}, label), ` · ${total.toLocaleString()} in all`), svg);
}

export async function usagePage(main, q, signal) {
  const flow = q.get('flow_id') || '';
  const report = await get(route('/usage', {flow_id: flow, from: q.get('from'), to: q.get('to')}));
  if (signal.aborted) return;
  const all = days(report.from, report.to);
  const index = new Map(all.map((d, i) => [d, i]));
  // The flows with the most runs get a colour each; the others share one.
  const runsOf = new Map();
  for (const item of report.items) runsOf.set(item.flow_id, (runsOf.get(item.flow_id) || 0) + item.runs);
  const ranked = [...runsOf.keys()].sort((a, b) => runsOf.get(b) - runsOf.get(a));
  const named = ranked.slice(0, SERIES);
  const stacksOf = (metric) => {
    const stacks = named.map((name) => ({name, values: all.map(() => 0)}));
    const others = {name: 'others', values: all.map(() => 0)};
    for (const item of report.items) {
      const i = index.get(item.day);
      if (i === undefined) continue;
      const k = named.indexOf(item.flow_id);
      (k >= 0 ? stacks[k] : others).values[i] += item[metric] || 0;
    }
    return ranked.length > SERIES ? [...stacks, others] : stacks;
  };
  const legend = h('ul', {class: 'legend'}, [...named, ...(ranked.length > SERIES ? ['others'] : [])]
    .map((name, k) => h('li', {}, h('span', {class: `swatch c${k}`}), name)));
  const flows = [...new Set(report.items.map((i) => i.flow_id))].sort();
  const form = h('form', {class: 'filters', onsubmit: (e) => {
    e.preventDefault();
    const data = new FormData(form);
    location.hash = route('#/usage', {flow_id: data.get('flow_id').trim(), from: data.get('from'), to: data.get('to')});
  }},
  h('label', {}, h('span', {}, 'Flow'), h('input', {name: 'flow_id', value: flow, placeholder: 'all', list: 'usage-flows'})),
  h('datalist', {id: 'usage-flows'}, flows.map((f) => h('option', {value: f}))),
  h('label', {}, h('span', {}, 'From'), h('input', {type: 'date', name: 'from', value: report.from})),
  h('label', {}, h('span', {}, 'To'), h('input', {type: 'date', name: 'to', value: report.to})),
  h('button', {type: 'submit'}, 'Show'));
  const quota = report.quota || {};
  fill(main,
    h('div', {class: 'bar'}, h('h1', {}, 'Usage'), h('span', {class: 'muted'}, `${report.from} to ${report.to} (UTC)`)),
    form,
    named.length ? legend : null,
    h('div', {class: 'charts'}, METRICS.map(([k, label]) => chart(label, all, stacksOf(k)))),
    h('p', {class: 'muted'}, 'Quotas per flow and day: ',
      `runs ${quota.runs_per_flow_per_day ?? 'none'}, tokens ${quota.tokens_per_flow_per_day ?? 'none'}.`),
    report.items.length
      ? h('table', {class: 'list'},
        h('thead', {}, h('tr', {}, ['Day', 'Flow', 'Runs', 'Node executions', 'Tokens', 'Models']
          .map((t) => h('th', {scope: 'col'}, t)))),
        h('tbody', {}, [...report.items].sort((a, b) => (a.day < b.day ? 1 : -1)).map((i) => h('tr', {},
          h('td', {}, i.day), h('td', {}, h('a', {href: `#/flows/${encodeURIComponent(i.flow_id)}`}, i.flow_id)),
          h('td', {class: 'num'}, i.runs.toLocaleString()), h('td', {class: 'num'}, i.node_executions.toLocaleString()),
          h('td', {class: 'num'}, (i.tokens || 0).toLocaleString()),
          h('td', {class: 'muted'}, (i.models || []).map((m) => `${m.model}: ${m.prompt_tokens}+${m.completion_tokens}`).join(', '))))))
      : h('div', {class: 'card empty'}, h('p', {}, 'Nothing ran in these days.')));
}
