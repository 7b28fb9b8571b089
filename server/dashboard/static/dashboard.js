/* rectalfl dashboard: progressive enhancement of the server-rendered pages.
 * runs page: filter as you type; run page: charts + live updates (server-sent events);
 * compare page: overlaid loss curves. Written for rectalfl; Apache-2.0 (see LICENSE.txt). */
(function () {
  'use strict';
  var body = document.body;
  var page = body.dataset.page;

  function byId(id) { return document.getElementById(id); }
  function setText(id, value) { var n = byId(id); if (n) n.textContent = value; }

  function fmtSeconds(s) {
    if (s === null || s === undefined || !isFinite(s)) return '-';
    if (s < 60) return s.toFixed(1) + ' s';
    var m = Math.floor(Math.round(s) / 60), sec = Math.round(s) % 60;
    if (m < 60) return m + ' min ' + String(sec).padStart(2, '0') + ' s';
    return Math.floor(m / 60) + ' h ' + String(m % 60).padStart(2, '0') + ' min';
  }

  function getJSON(url) {
    return fetch(url, {credentials: 'same-origin', headers: {Accept: 'application/json'}}).then(function (r) {
      if (!r.ok) throw new Error(url + ': HTTP ' + r.status);
      return r.json();
    });
  }

  function toSeries(obj) {
    return Object.keys(obj || {}).sort().map(function (k) { return {name: k, points: obj[k]}; });
  }

  /* ---------------------------------------------------------------- runs list */
  function initRuns() {
    var q = byId('filter-q'), st = byId('filter-status');
    var rows = Array.prototype.slice.call(document.querySelectorAll('tr.run-row'));
    function apply() {
      var needle = (q.value || '').toLowerCase();
      rows.forEach(function (tr) {
        tr.hidden = !((tr.dataset.text || '').indexOf(needle) >= 0 && (!st.value || tr.dataset.status === st.value));
      });
    }
    if (q) q.addEventListener('input', apply);
    if (st) st.addEventListener('change', apply);
  }

  /* ---------------------------------------------------------------- one run */
  function initRun() {
    var id = body.dataset.runId;
    var pageUrl = '/runs/' + encodeURIComponent(id);
    var apiUrl = '/api/runs/' + encodeURIComponent(id);
    var loss = null;
    var liveText = body.dataset.status === 'running' ? 'live' : 'finished';
    var select = byId('site-backbone');

    function drawSites() {
      if (!loss) return;
      var chosen = select.value;
      var series = Object.keys(loss.sites || {}).sort().map(function (site) {
        return {name: site, points: (loss.sites[site] || {})[chosen] || []};
      });
      MiniChart.line(byId('chart-sites'), {series: series, xLabel: 'round', xInteger: true, yLabel: 'training loss'});
    }

    function draw(data) {
      loss = data.loss || {consortium: {}, sites: {}};
      MiniChart.line(byId('chart-consortium'), {series: toSeries(loss.consortium), xLabel: 'round', xInteger: true,
                                                yLabel: 'training loss'});
      var keys = {};
      Object.keys(loss.sites || {}).forEach(function (s) { Object.keys(loss.sites[s]).forEach(function (k) { keys[k] = 1; }); });
      var names = Object.keys(keys).sort(function (a, b) {
        return (a.indexOf('all backbones') === 0 ? -1 : 0) - (b.indexOf('all backbones') === 0 ? -1 : 0) || a.localeCompare(b);
      });
      var current = select.value;
      while (select.firstChild) select.removeChild(select.firstChild);
      names.forEach(function (k) {
        var o = document.createElement('option');
        o.value = k; o.textContent = k;
        select.appendChild(o);
      });
      if (names.indexOf(current) >= 0) select.value = current;
      drawSites();
    }
    select.addEventListener('change', drawSites);

    function loadCharts() {
      return getJSON(apiUrl).then(draw).catch(function (e) { setText('live-state', 'charts unavailable: ' + e.message); });
    }

    var busy = false, again = false;
    function refresh() {
      if (busy) { again = true; return Promise.resolve(); }
      busy = true;
      return fetch(pageUrl, {credentials: 'same-origin', headers: {Accept: 'text/html'}})
        .then(function (r) { if (!r.ok) throw new Error('HTTP ' + r.status); return r.text(); })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, 'text/html');
          document.querySelectorAll('[data-live]').forEach(function (section) {
            var fresh = doc.getElementById(section.id);
            if (fresh) section.replaceWith(document.importNode(fresh, true));
          });
          var head = doc.querySelector('.runhead'), mine = document.querySelector('.runhead');
          if (head && mine) mine.replaceWith(document.importNode(head, true));
          document.title = doc.title;
          setText('live-state', liveText);
          return loadCharts();
        })
        .catch(function (e) { setText('live-state', 'update failed: ' + e.message); })
        .then(function () { busy = false; if (again) { again = false; refresh(); } });
    }

    loadCharts();
    if (body.dataset.status === 'running' && window.EventSource) {
      var es = new EventSource(apiUrl + '/stream');
      es.addEventListener('update', function (ev) {
        var s = JSON.parse(ev.data);
        setText('rounds-done', String(s.rounds_done));
        if (s.eta_s !== null && s.eta_s !== undefined) setText('eta', fmtSeconds(s.eta_s));
        liveText = 'live · updated ' + new Date().toLocaleTimeString();
        setText('live-state', liveText);
        refresh();
      });
      es.addEventListener('done', function (ev) {
        es.close();
        liveText = 'finished (' + JSON.parse(ev.data).status + ')';
        body.dataset.status = JSON.parse(ev.data).status;
        refresh();
      });
      es.addEventListener('problem', function (ev) {
        es.close();
        liveText = 'live updates stopped: ' + JSON.parse(ev.data).error;
        setText('live-state', liveText);
      });
      es.onerror = function () { setText('live-state', 'reconnecting…'); };
    }
  }

  /* ---------------------------------------------------------------- compare */
  function initCompare() {
    var runs = (body.dataset.runs || '').split(',').filter(Boolean);
    if (runs.length < 2 || !byId('chart-compare')) return;
    var qs = runs.map(function (r) { return 'run=' + encodeURIComponent(r); }).join('&');
    getJSON('/api/compare?' + qs).then(function (cmp) {
      var series = cmp.runs.map(function (x) { return {name: x.run.name + ' (' + x.run.run_id + ')', points: x.loss}; });
      MiniChart.line(byId('chart-compare'), {series: series, xLabel: 'round', xInteger: true, yLabel: 'mean training loss'});
    }).catch(function (e) { setText('chart-compare', 'chart unavailable: ' + e.message); });
  }

  if (page === 'runs') initRuns();
  else if (page === 'run') initRun();
  else if (page === 'compare') initCompare();
})();
