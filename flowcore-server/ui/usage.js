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

function chart(label, series, total) {
  const w = 640;
  const hgt = 150;
  const max = Math.max(1, ...series.map(([, v]) => v));
  const bw = w / Math.max(1, series.length);
  const svg = s('svg', {class: 'chart', viewBox: `0 0 ${w} ${hgt + 22}`, role: 'img',
    'aria-label': `${label} per day, ${total} in all`});
  svg.append(s('line', {x1: 0, x2: w, y1: hgt, y2: hgt, class: 'axis'}));
  series.forEach(([day, v], i) => {
    const bh = (v / max) * (hgt - 8);
    svg.append(s('rect', {x: i * bw + 1, y: hgt - bh, width: Math.max(1, bw - 2), height: bh, class: 'bar'},
      s('title', {}, `${day}: ${v.toLocaleString()}`)));
  });
  const ticks = [0, Math.floor(series.length / 2), series.length - 1].filter((i, k, a) => series[i] && a.indexOf(i) === k);
  for (const i of ticks) {
    svg.append(s('text', {x: Math.min(w - 70, i * bw), y: hgt + 16, class: 'tick'}, series[i][0]));
  }
  svg.append(s('text', {x: 4, y: 12, class: 'tick'}, `max ${max.toLocaleString()}`));
  return h('figure', {class: 'card'}, h('figcaption', {}, h('strong', {}, label), ` · ${total.toLocaleString()} in all`), svg);
}

export async function usagePage(main, q, signal) {
  const flow = q.get('flow_id') || '';
  const report = await get(route('/usage', {flow_id: flow, from: q.get('from'), to: q.get('to')}));
  if (signal.aborted) return;
  const all = days(report.from, report.to);
  const byDay = new Map(all.map((d) => [d, {runs: 0, node_executions: 0, tokens: 0}]));
  for (const item of report.items) {
    const day = byDay.get(item.day);
    if (!day) continue;
    for (const [k] of METRICS) day[k] += item[k] || 0;
  }
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
    h('div', {class: 'charts'}, METRICS.map(([k, label]) => chart(label,
      all.map((d) => [d, byDay.get(d)[k]]), all.reduce((t, d) => t + byDay.get(d)[k], 0)))),
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
