/*! minichart.js - tiny dependency-free SVG line charts for the rectalfl dashboard.
 * Written for rectalfl (no third-party code); same licence as rectalfl (Apache-2.0), see LICENSE.txt.
 *
 * MiniChart.line(container, {series: [{name, points: [[x, y], ...]}], xLabel, yLabel, height, xInteger})
 * draws an SVG chart with axes, nice ticks, one polyline per series and an HTML legend.
 * Text is always set with textContent (never innerHTML), so series names cannot inject markup.
 */
(function (global) {
  'use strict';
  var NS = 'http://www.w3.org/2000/svg';
  var PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
                 '#bcbd22', '#17becf', '#393b79', '#ad494a', '#637939', '#e6550d', '#6b6ecf', '#843c39'];

  function el(tag, attrs, parent) {
    var node = document.createElementNS(NS, tag);
    for (var k in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, k)) node.setAttribute(k, attrs[k]); }
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, str, attrs) {
    var t = el('text', Object.assign({x: x, y: y}, attrs || {}), parent);
    t.textContent = str;
    return t;
  }

  /* "Nice" tick values covering [lo, hi] with about n ticks (1, 2, 5 x 10^k steps). */
  function niceTicks(lo, hi, n, integer) {
    if (!isFinite(lo) || !isFinite(hi)) return [];
    if (lo === hi) { var pad = Math.abs(lo) * 0.1 || 1; lo -= pad; hi += pad; }
    var raw = (hi - lo) / Math.max(1, n || 5);
    var mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (m) { return m * mag; }).find(function (s) { return s >= raw; });
    if (integer) step = Math.max(1, Math.round(step));
    var out = [];
    for (var v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    if (out[out.length - 1] < hi) out.push(+(out[out.length - 1] + step).toPrecision(12));
    return out;
  }

  function fmt(v) {
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
    return String(+v.toPrecision(4));
  }

  function line(container, opts) {
    opts = opts || {};
    var series = (opts.series || []).map(function (s) {
      return {name: String(s.name), points: (s.points || []).filter(function (p) {
        return p && isFinite(p[0]) && isFinite(p[1]) && p[0] !== null && p[1] !== null;
      })};
    }).filter(function (s) { return s.points.length; });
    while (container.firstChild) container.removeChild(container.firstChild);
    var width = opts.width || container.clientWidth || 560;
    var height = opts.height || 260;
    var m = {l: 56, r: 12, t: 10, b: 40};
    var svg = el('svg', {viewBox: '0 0 ' + width + ' ' + height, width: width, height: height,
                         role: 'img', 'class': 'minichart'}, container);
    if (!series.length) {
      text(svg, width / 2, height / 2, opts.empty || 'no data yet', {'text-anchor': 'middle', 'class': 'mc-empty'});
      return svg;
    }
    var xs = [], ys = [];
    series.forEach(function (s) { s.points.forEach(function (p) { xs.push(+p[0]); ys.push(+p[1]); }); });
    var xt = niceTicks(Math.min.apply(null, xs), Math.max.apply(null, xs), Math.min(8, Math.max(2, xs.length)),
                       opts.xInteger);
    var yt = niceTicks(Math.min.apply(null, ys), Math.max.apply(null, ys), 5);
    var x0 = xt[0], x1 = xt[xt.length - 1], y0 = yt[0], y1 = yt[yt.length - 1];
    var W = width - m.l - m.r, H = height - m.t - m.b;
    function X(v) { return m.l + (x1 === x0 ? W / 2 : (v - x0) / (x1 - x0) * W); }
    function Y(v) { return m.t + H - (y1 === y0 ? H / 2 : (v - y0) / (y1 - y0) * H); }
    var grid = el('g', {'class': 'mc-grid'}, svg);
    yt.forEach(function (v) {
      el('line', {x1: m.l, x2: m.l + W, y1: Y(v), y2: Y(v)}, grid);
      text(svg, m.l - 6, Y(v) + 4, fmt(v), {'text-anchor': 'end', 'class': 'mc-tick'});
    });
    xt.forEach(function (v) {
      el('line', {x1: X(v), x2: X(v), y1: m.t + H, y2: m.t + H + 4, 'class': 'mc-axis'}, svg);
      text(svg, X(v), m.t + H + 16, fmt(v), {'text-anchor': 'middle', 'class': 'mc-tick'});
    });
    el('line', {x1: m.l, x2: m.l + W, y1: m.t + H, y2: m.t + H, 'class': 'mc-axis'}, svg);
    el('line', {x1: m.l, x2: m.l, y1: m.t, y2: m.t + H, 'class': 'mc-axis'}, svg);
    if (opts.xLabel) text(svg, m.l + W / 2, height - 4, opts.xLabel, {'text-anchor': 'middle', 'class': 'mc-label'});
    if (opts.yLabel) {
      text(svg, 12, m.t + H / 2, opts.yLabel,
           {'text-anchor': 'middle', 'class': 'mc-label', transform: 'rotate(-90 12 ' + (m.t + H / 2) + ')'});
    }
    var legend = document.createElement('div');
    legend.className = 'mc-legend';
    series.forEach(function (s, i) {
      var colour = PALETTE[i % PALETTE.length];
      var g = el('g', {'class': 'mc-series', 'data-name': s.name}, svg);
      var pts = s.points.map(function (p) { return X(+p[0]).toFixed(1) + ',' + Y(+p[1]).toFixed(1); }).join(' ');
      el('polyline', {points: pts, fill: 'none', stroke: colour, 'stroke-width': 1.8}, g);
      if (s.points.length <= 60) {
        s.points.forEach(function (p) {
          var c = el('circle', {cx: X(+p[0]), cy: Y(+p[1]), r: 2.6, fill: colour}, g);
          var t = el('title', {}, c);
          t.textContent = s.name + ': ' + fmt(+p[0]) + ', ' + fmt(+p[1]);
        });
      }
      var item = document.createElement('span');
      item.className = 'mc-key';
      var sw = document.createElement('i');
      sw.style.background = colour;
      item.appendChild(sw);
      item.appendChild(document.createTextNode(s.name));
      legend.appendChild(item);
    });
    container.appendChild(legend);
    return svg;
  }

  global.MiniChart = {line: line, niceTicks: niceTicks, PALETTE: PALETTE};
})(window);
