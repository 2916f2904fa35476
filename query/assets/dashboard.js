// Marsad's marketing dashboard: reads /v1/reports/* with an analyst key (or an
// advertiser's, which sees its own campaigns only) and draws them with the
// vendored Chart.js. Nothing is fetched from elsewhere. Every number is as the
// reports release it: with noise, shown as ≈ with its 95% interval on hover.
'use strict';

const I18N = {
  en: {
    title: 'Marsad — audience analytics', switch_language: 'العربية', sign_out: 'Sign out',
    key_label: 'Analyst key', sign_in: 'Sign in', from: 'From', to: 'To', granularity: 'Granularity',
    hour: 'Hour', day: 'Day', week: 'Week', month: 'Month', country: 'Country', device: 'Device', all: 'All',
    desktop: 'Desktop', mobile: 'Mobile', tablet: 'Tablet', apply: 'Apply',
    suppression_note: 'Numbers are estimates (≈): each carries a little random noise so that no visitor can be singled out, and rows with too few visitors are not shown. Hover a number for its 95% interval.',
    interval: '95% interval', exact: 'exact', view_campaign_days: 'Campaigns by day',
    view_campaign_countries: 'Campaigns by country', view_campaign_devices: 'Campaigns by device',
    day_label: 'Day', budget_spent: 'Privacy budget spent today',
    privacy_footer: 'Only anonymous aggregates are shown here.',
    view_traffic: 'Traffic over time', view_categories: 'Top categories', view_geo: 'Geography',
    view_devices: 'Devices, systems and browsers', view_campaigns: 'Campaigns', view_demographics: 'Demographics',
    page_views: 'Page views', visitors: 'Unique visitors', sessions: 'Sessions', events: 'Events',
    impressions: 'Impressions', clicks: 'Clicks', ctr: 'CTR', bounces: 'Bounces', session_seconds: 'Session seconds',
    period: 'Period', region: 'Region', device_type: 'Device', os: 'OS', browser: 'Browser',
    page_category: 'Category', campaign_id: 'Campaign', age_band: 'Age band', gender: 'Gender',
    csv: 'CSV', no_data: 'No data in this range', loading: 'Loading…', updated: 'Updated',
    bad_key: 'This key is wrong or has neither the analyst nor the advertiser role.', all_countries: 'All countries', regions_of: 'Regions of',
    withheld: 'withheld', error: 'Could not load',
    cat_cars: 'Cars', cat_real_estate: 'Real estate', cat_jobs: 'Jobs', cat_electronics: 'Electronics',
    cat_furniture: 'Furniture', cat_services: 'Services', cat_other: 'Other',
    gender_female: 'Female', gender_male: 'Male', gender_other: 'Other', not_declared: 'Not declared',
    view_sources: 'Where visitors come from', view_pages: 'Top, entry and exit pages',
    channel: 'Channel', page_path: 'Page', entries: 'Entries', exits: 'Exits', bounce_rate: 'Bounce rate',
    exit_rate: 'Exit rate', compare: 'Compare with', no_comparison: 'Nothing', previous_period: 'Previous period',
    previous_year: 'Same period last year', change: 'Change', previous: 'Before', total: 'Total',
    ch_organic_search: 'Organic search', ch_paid_search: 'Paid search', ch_social: 'Social',
    ch_paid_social: 'Paid social', ch_email: 'E-mail', ch_display: 'Display', ch_referral: 'Referral',
    ch_direct: 'Direct',
    view_goals: 'Goals', view_funnels: 'Funnels', goal_id: 'Goal', funnel_id: 'Funnel', step: 'Step',
    conversions: 'Conversions', conversion_rate: 'Conversion rate', from_previous: 'Kept from the step before',
    drop_off: 'Drop-off',
    view_live: 'Right now: the last 30 minutes', live_visitors: 'Visitors in the last 30 minutes',
    live_page_views: 'Page views in the last 30 minutes', live_unavailable: 'The live view is not served here',
    live_held_back: 'Too few visitors to show', minute: 'Minute',
  },
  ar: {
    title: 'مرصد — تحليلات الجمهور', switch_language: 'English', sign_out: 'تسجيل الخروج',
    key_label: 'مفتاح المحلل', sign_in: 'تسجيل الدخول', from: 'من', to: 'إلى', granularity: 'الدقة الزمنية',
    hour: 'ساعة', day: 'يوم', week: 'أسبوع', month: 'شهر', country: 'الدولة', device: 'الجهاز', all: 'الكل',
    desktop: 'حاسوب', mobile: 'جوال', tablet: 'جهاز لوحي', apply: 'تطبيق',
    suppression_note: 'الأرقام تقديرية (≈): يُضاف إلى كل رقم قدر يسير من الضجيج العشوائي كي لا يمكن تمييز أي زائر، ولا تُعرض الصفوف ذات الزوار القليلين. مرّر المؤشر فوق الرقم لرؤية مجال الثقة ٩٥٪.',
    interval: 'مجال الثقة ٩٥٪', exact: 'دقيق', view_campaign_days: 'الحملات حسب اليوم',
    view_campaign_countries: 'الحملات حسب الدولة', view_campaign_devices: 'الحملات حسب الجهاز',
    day_label: 'اليوم', budget_spent: 'ما أُنفق اليوم من ميزانية الخصوصية',
    privacy_footer: 'لا تُعرض هنا إلا بيانات مجمّعة مجهولة الهوية.',
    view_traffic: 'الزيارات عبر الزمن', view_categories: 'أهم الفئات', view_geo: 'الجغرافيا',
    view_devices: 'الأجهزة وأنظمة التشغيل والمتصفحات', view_campaigns: 'الحملات', view_demographics: 'الفئات السكانية',
    page_views: 'مشاهدات الصفحات', visitors: 'زوار فريدون', sessions: 'جلسات', events: 'أحداث',
    impressions: 'مرات الظهور', clicks: 'نقرات', ctr: 'نسبة النقر', bounces: 'ارتدادات', session_seconds: 'ثواني الجلسات',
    period: 'الفترة', region: 'المنطقة', device_type: 'الجهاز', os: 'نظام التشغيل', browser: 'المتصفح',
    page_category: 'الفئة', campaign_id: 'الحملة', age_band: 'الفئة العمرية', gender: 'الجنس',
    csv: 'تصدير CSV', no_data: 'لا توجد بيانات في هذه الفترة', loading: 'جارٍ التحميل…', updated: 'حُدّث',
    bad_key: 'المفتاح غير صحيح أو لا يملك دور المحلل ولا دور المعلن.', all_countries: 'كل الدول', regions_of: 'مناطق',
    withheld: 'محجوب', error: 'تعذّر التحميل',
    cat_cars: 'سيارات', cat_real_estate: 'عقارات', cat_jobs: 'وظائف', cat_electronics: 'إلكترونيات',
    cat_furniture: 'أثاث', cat_services: 'خدمات', cat_other: 'أخرى',
    gender_female: 'أنثى', gender_male: 'ذكر', gender_other: 'آخر', not_declared: 'غير مصرّح',
    view_sources: 'من أين يأتي الزوار', view_pages: 'أهم الصفحات وصفحات الدخول والخروج',
    channel: 'القناة', page_path: 'الصفحة', entries: 'مرات الدخول', exits: 'مرات الخروج', bounce_rate: 'معدل الارتداد',
    exit_rate: 'معدل الخروج', compare: 'المقارنة مع', no_comparison: 'لا شيء', previous_period: 'الفترة السابقة',
    previous_year: 'الفترة نفسها من العام الماضي', change: 'التغيّر', previous: 'قبل', total: 'الإجمالي',
    ch_organic_search: 'بحث مجاني', ch_paid_search: 'بحث مدفوع', ch_social: 'شبكات التواصل',
    ch_paid_social: 'تواصل مدفوع', ch_email: 'البريد الإلكتروني', ch_display: 'إعلانات مصوّرة', ch_referral: 'إحالة',
    ch_direct: 'مباشر',
    view_goals: 'الأهداف', view_funnels: 'مسارات التحويل', goal_id: 'الهدف', funnel_id: 'المسار', step: 'الخطوة',
    conversions: 'التحويلات', conversion_rate: 'معدل التحويل', from_previous: 'المتبقّي من الخطوة السابقة',
    drop_off: 'نسبة التسرّب',
    view_live: 'الآن: آخر 30 دقيقة', live_visitors: 'زوار في آخر 30 دقيقة', live_page_views: 'مشاهدات في آخر 30 دقيقة',
    live_unavailable: 'العرض المباشر غير متاح هنا', live_held_back: 'عدد الزوار أقل من أن يُعرض',
    minute: 'الدقيقة',
  },
};

// Each view: which report, how a row is labelled, what is drawn, which filters the report takes.
const VIEWS = [
  { id: 'traffic', kind: 'line', label: (r) => String(r.period || '').replace('T', ' ').slice(0, 16),
    measures: ['page_views', 'visitors', 'sessions'], filters: ['country', 'device_type'], timed: true },
  { id: 'categories', kind: 'bar', label: (r) => categoryName(r.page_category), measures: ['page_views', 'visitors'],
    filters: ['country', 'device_type'] },
  { id: 'geo', kind: 'bar', label: (r) => (r.region !== undefined ? r.region || '?' : r.country), measures: ['visitors', 'page_views'],
    filters: ['country', 'device_type'], drill: true, map: true },
  { id: 'devices', kind: 'bar', label: (r) => [r.device_type, r.os, r.browser].join(' · '), measures: ['visitors', 'page_views'],
    filters: ['country', 'device_type'] },
  { id: 'campaigns', kind: 'bar', label: (r) => r.campaign_id, measures: ['impressions', 'clicks'], extra: ['ctr'],
    filters: ['country', 'device_type'] },
  { id: 'sources', kind: 'bar', label: (r) => channelName(r.channel), measures: ['sessions', 'visitors'],
    extra: ['bounce_rate'], filters: ['country', 'device_type'] },
  { id: 'pages', kind: 'bar', label: (r) => ltr(r.page_path || '—'), measures: ['page_views', 'entries', 'exits'],
    extra: ['exit_rate'], filters: ['country', 'device_type'], order: 'page_views', limit: 50 },
  { id: 'goals', kind: 'bar', label: (r) => r.goal_id, measures: ['conversions', 'visitors'], extra: ['conversion_rate'],
    filters: ['country', 'device_type'] },
  { id: 'funnels', kind: 'bar', label: (r) => `${r.funnel_id} · ${r.step}`, measures: ['sessions'],
    extra: ['from_previous', 'drop_off'], filters: ['country', 'device_type'], keepOrder: true, noTotal: true },
  { id: 'demographics', kind: 'bar', label: (r) => (r.age_band || r.gender ? `${r.age_band || '?'} · ${genderName(r.gender)}` : t('not_declared')), measures: ['events', 'visitors'],
    filters: ['country'] },
];
// An advertiser (a third party) sees its own campaigns only, broken down.
const ADVERTISER_VIEWS = [
  { id: 'campaigns', report: 'campaigns', kind: 'bar', label: (r) => r.campaign_id, measures: ['impressions', 'clicks'],
    extra: ['ctr', 'visitors'], filters: ['country', 'device_type'] },
  { id: 'campaign_days', report: 'campaigns', by: 'day', kind: 'bar',
    label: (r) => `${r.campaign_id} · ${String(r.day || '').slice(0, 10)}`, measures: ['impressions', 'clicks'],
    extra: ['ctr', 'visitors'], filters: ['country', 'device_type'] },
  { id: 'campaign_countries', report: 'campaigns', by: 'country', kind: 'bar',
    label: (r) => `${r.campaign_id} · ${r.country || '?'}`, measures: ['impressions', 'clicks'], extra: ['ctr', 'visitors'],
    filters: ['device_type'] },
  { id: 'campaign_devices', report: 'campaigns', by: 'device_type', kind: 'bar',
    label: (r) => `${r.campaign_id} · ${r.device_type || '?'}`, measures: ['impressions', 'clicks'], extra: ['ctr', 'visitors'],
    filters: ['country'] },
];
const COLOURS = ['#0f6e8c', '#e07a1f', '#6a9f3a', '#8e5ea2', '#c0392b'];
// The views of the signed-in key's role.
let views = VIEWS;

const state = {
  lang: localStorage.getItem('marsad.lang') || 'en',
  key: sessionStorage.getItem('marsad.key') || '',
  role: '',       // 'analyst' or 'advertiser'
  reports: {},   // view id -> last report JSON
  charts: {},    // view id -> Chart
  geoCountry: '', // the country the geography view is drilled into
  loading: 0,
  updatedAt: null, // when every view last loaded
  live: null,     // the last /v1/live answer
  liveTimer: null,
};

const $ = (id) => document.getElementById(id);
const t = (word) => (I18N[state.lang] || I18N.en)[word] || word;
// Built-in categories and genders have names in both languages; other values show as stored.
const named = (prefix, id, missing) => (id ? ((I18N[state.lang] || I18N.en)[`${prefix}${id}`] || id) : missing);
const categoryName = (id) => named('cat_', id, '—');
const genderName = (id) => named('gender_', id, t('not_declared'));
const channelName = (id) => named('ch_', id, '—');
// A path reads left to right, whatever the page's direction and the script of its segments.
const ltr = (text) => `\u2066${text}\u2069`;
const RATES = ['ctr', 'bounce_rate', 'exit_rate', 'conversion_rate', 'from_previous', 'drop_off', 'from_start'];

function applyLanguage() {
  document.documentElement.lang = state.lang;
  document.documentElement.dir = state.lang === 'ar' ? 'rtl' : 'ltr';
  document.querySelectorAll('[data-i18n]').forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.title = t('title');
  showUpdated();
  if (!$('dashboard').hidden) {
    fillChoices();
    views.forEach(render);
    renderLive();
  }
}

function showUpdated() {
  if (state.updatedAt) $('status').textContent = `${t('updated')} ${state.updatedAt.toLocaleTimeString(state.lang)}`;
}

function isoDate(d) { return d.toISOString().slice(0, 10); }

function initDates() {
  const today = new Date();
  $('to').value = isoDate(today);
  $('from').value = isoDate(new Date(today.getTime() - 29 * 86400000));
}

function params(view) {
  const p = new URLSearchParams({ from: $('from').value, to: $('to').value });
  if (view.by) p.set('by', view.by);
  if (view.order) p.set('order', view.order);
  if (view.limit) p.set('limit', String(view.limit));
  if ($('compare').value) p.set('compare', $('compare').value);
  if (view.timed) p.set('granularity', $('granularity').value);
  const country = $('country').value || (view.drill ? state.geoCountry : '');
  if (country && view.filters.includes('country')) p.set('country', country);
  const device = $('device').value;
  if (device && view.filters.includes('device_type')) p.set('device_type', device);
  return p;
}

async function api(path, attempt = 0) {
  const resp = await fetch(path, { headers: { Authorization: `Bearer ${state.key}` } });
  // the service runs a few queries at once and asks the rest to come back: do so, a few times
  // (a spent privacy budget is a 429 too, with hours to wait: that one is shown, not retried)
  const wait = Number(resp.headers.get('Retry-After')) || 1;
  if ((resp.status === 503 || resp.status === 429) && wait <= 10 && attempt < 5) {
    await new Promise((done) => setTimeout(done, wait * 1000));
    return api(path, attempt + 1);
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = new Error(body.error || `${resp.status}`);
    err.status = resp.status;
    throw err;
  }
  return body;
}

async function signIn(key) {
  state.key = key;
  const today = isoDate(new Date());
  // an analyst reads every report; an advertiser (403 here) its campaigns only
  try {
    await api(`/v1/reports/categories?from=${today}&to=${today}`);
    state.role = 'analyst';
    views = VIEWS;
  } catch (e) {
    if (e.status !== 403) throw e;
    await api(`/v1/reports/campaigns?from=${today}&to=${today}`);
    state.role = 'advertiser';
    views = ADVERTISER_VIEWS;
  }
  document.body.dataset.role = state.role;
  buildViews();
  sessionStorage.setItem('marsad.key', key);
  $('sign-in').hidden = true;
  $('dashboard').hidden = false;
  $('sign-out').hidden = false;
  if (state.role === 'analyst') startLive();
  await loadAll();
}

function signOut() {
  stopLive();
  sessionStorage.removeItem('marsad.key');
  state.key = '';
  Object.values(state.charts).forEach((c) => c.destroy());
  state.charts = {};
  state.reports = {};
  state.updatedAt = null;
  $('status').textContent = '';
  $('dashboard').hidden = true;
  $('sign-out').hidden = true;
  $('sign-in').hidden = false;
}

function buildViews() {
  const container = $('views');
  container.textContent = '';
  for (const view of views) {
    const section = document.createElement('section');
    section.className = 'view';
    section.id = `view-${view.id}`;
    section.innerHTML = `<header><h2></h2><button type="button" class="csv"></button></header>
      <p class="crumb"></p><p class="totals"></p><div class="map" hidden></div><div class="canvas"><canvas></canvas></div><p class="empty" hidden></p>
      <div class="table-wrap"><table><thead></thead><tbody></tbody></table></div>`;
    section.querySelector('button.csv').addEventListener('click', () => download(view.id));
    container.appendChild(section);
  }
}

async function loadView(view) {
  const section = $(`view-${view.id}`);
  section.querySelector('.empty').hidden = false;
  section.querySelector('.empty').textContent = t('loading');
  try {
    state.reports[view.id] = await api(`/v1/reports/${view.report || view.id}?${params(view)}`);
    state.reports[view.id].error = undefined;
  } catch (e) {
    state.reports[view.id] = { rows: [], dimensions: [], error: `${t('error')}: ${e.message}` };
  }
  render(view);
}

// The filters offer the values the reports released (countries of the geography view,
// devices of the devices view): nothing is listed that a report did not already show.
function fillChoices() {
  const offer = (id, values, name) => {
    const select = $(id);
    const chosen = select.value;
    const known = new Set([...values, ...(chosen ? [chosen] : [])].filter(Boolean));
    select.textContent = '';
    const all = document.createElement('option');
    all.value = '';
    all.dataset.i18n = 'all';
    all.textContent = t('all');
    select.appendChild(all);
    for (const v of [...known].sort()) {
      const option = document.createElement('option');
      option.value = v;
      option.textContent = name(v);
      select.appendChild(option);
    }
    select.value = chosen;
  };
  const geo = state.reports.geo;
  if (geo && !(geo.filters || {}).country) offer('country', (geo.rows || []).map((r) => r.country), (v) => v);
  const devices = state.reports.devices;
  if (devices) offer('device', (devices.rows || []).map((r) => r.device_type), (v) => t(v));
}

async function loadAll() {
  $('status').textContent = t('loading');
  await Promise.all(views.map(loadView));
  fillChoices();
  state.updatedAt = new Date();
  showUpdated();
  document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
}

function columnsOf(view, report) {
  const dims = (report.dimensions || []).map((d) => (Array.isArray(d) ? d[1] : d));
  return { dims, measures: [...view.measures, ...(view.extra || [])] };
}

function formatNumber(value, measure, ci95) {
  if (value === null || value === undefined) return '—';
  if (RATES.includes(measure)) return new Intl.NumberFormat(state.lang, { style: 'percent', maximumFractionDigits: 2 }).format(value);
  const text = new Intl.NumberFormat(state.lang).format(value);
  return ci95 ? `≈ ${text}` : text;
}

// The hover text of a released number: its 95% interval, or that it is exact.
function intervalOf(value, ci95) {
  if (value === null || value === undefined) return '';
  if (!ci95) return t('exact');
  const f = new Intl.NumberFormat(state.lang);
  return `${t('interval')}: ${f.format(Math.max(0, value - ci95))} – ${f.format(value + ci95)} (± ${f.format(ci95)})`;
}

// The arrow and relative change of a measure against the compared period, as an element
// (nothing when either period's number was not released).
function changeBadge(change) {
  if (!change || change.direction === undefined) return null;
  const span = document.createElement('span');
  span.className = `change ${change.direction}`;
  const arrow = { up: '▲', down: '▼', flat: '=' }[change.direction] || '';
  const rel = change.relative === null || change.relative === undefined ? ''
    : ` ${new Intl.NumberFormat(state.lang, { style: 'percent', maximumFractionDigits: 0, signDisplay: 'exceptZero' }).format(change.relative)}`;
  span.textContent = `${arrow}${rel}`;
  const f = new Intl.NumberFormat(state.lang);
  span.title = `${t('previous')}: ≈ ${f.format(change.previous)}`;
  span.dataset.direction = change.direction;
  return span;
}

// The totals of a view, each with its change when compared.
function drawTotals(view, section, report) {
  const box = section.querySelector('.totals');
  box.textContent = '';
  const total = report.total;
  // (a funnel's steps hold the same sessions again: their sum is no total)
  if (!total || view.noTotal) return;
  for (const m of view.measures) {
    const item = document.createElement('span');
    item.className = 'total';
    item.textContent = `${t(m)}: ${formatNumber(total[m], m, total.ci95 ? total.ci95[m] : 0)}`;
    const badge = changeBadge(report.change && report.change[m]);
    if (badge) item.append(' ', badge);
    box.appendChild(item);
  }
}

// The country map: the vendored world-atlas shapes (TopoJSON, Natural Earth 1:50m), decoded
// here and drawn as SVG over the Arab world; each country shaded by its released visitors.
const MAP = { shapes: null, codes: null, loading: null };
const MAP_BOX = { west: -18, east: 63, south: 8, north: 43 }; // Morocco to Oman
const SVG_NS = ['http:', '', 'www.w3.org', '2000', 'svg'].join('/'); // the SVG namespace, a name, not a URL fetched

function loadMap() {
  if (!MAP.loading) {
    MAP.loading = Promise.all([
      fetch('/assets/countries-50m.json').then((r) => r.json()),
      fetch('/assets/country-codes.json').then((r) => r.json()),
    ]).then(([topology, codes]) => { MAP.shapes = decodeCountries(topology); MAP.codes = codes; });
  }
  return MAP.loading;
}

// TopoJSON: quantized, delta-encoded arcs shared by the polygons that border on them.
function decodeCountries(topology) {
  const [sx, sy] = topology.transform.scale;
  const [tx, ty] = topology.transform.translate;
  const arcs = topology.arcs.map((arc) => {
    let x = 0;
    let y = 0;
    return arc.map(([dx, dy]) => { x += dx; y += dy; return [x * sx + tx, y * sy + ty]; });
  });
  const ring = (indexes) => {
    const points = [];
    for (const i of indexes) {
      const arc = i < 0 ? [...arcs[~i]].reverse() : arcs[i];
      points.push(...(points.length ? arc.slice(1) : arc));
    }
    return points;
  };
  return topology.objects.countries.geometries.map((g) => {
    const polygons = g.type === 'Polygon' ? [g.arcs] : g.type === 'MultiPolygon' ? g.arcs : [];
    return { id: g.id, name: (g.properties || {}).name || '', rings: polygons.flatMap((p) => p.map(ring)) };
  });
}

function project([lon, lat]) {
  const k = Math.cos((((MAP_BOX.north + MAP_BOX.south) / 2) * Math.PI) / 180);
  return [(lon - MAP_BOX.west) * k * 10, (MAP_BOX.north - lat) * 10];
}

async function drawMap(view, section, report) {
  const box = section.querySelector('.map');
  if (!view.map || report.error || (report.filters || {}).country) { box.hidden = true; return; }
  box.hidden = false;
  try { await loadMap(); } catch (e) { box.textContent = `${t('error')}: map`; return; }
  const visitors = new Map((report.rows || []).filter((r) => r.country).map((r) => [r.country, r.visitors]));
  const most = Math.max(1, ...visitors.values());
  const k = Math.cos((((MAP_BOX.north + MAP_BOX.south) / 2) * Math.PI) / 180);
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('class', 'map');
  svg.setAttribute('viewBox', `0 0 ${(MAP_BOX.east - MAP_BOX.west) * k * 10} ${(MAP_BOX.north - MAP_BOX.south) * 10}`);
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', t('view_geo'));
  const f = new Intl.NumberFormat(state.lang);
  for (const shape of MAP.shapes) {
    const code = MAP.codes[shape.id];
    const d = shape.rings.map((r) => `M${r.map((p) => project(p).map((v) => v.toFixed(1)).join(',')).join('L')}Z`).join('');
    if (!d) continue;
    const path = document.createElementNS(SVG_NS, 'path');
    path.setAttribute('d', d);
    const n = code ? visitors.get(code) : undefined;
    // five shades by share of the busiest country; none where nothing was released
    const shade = n === undefined ? 'none' : String(Math.min(4, Math.floor((n / most) * 4.999)));
    path.setAttribute('class', `country shade-${shade}`);
    if (code) path.dataset.country = code;
    if (n !== undefined) path.dataset.visitors = String(n);
    const title = document.createElementNS(SVG_NS, 'title');
    title.textContent = n === undefined ? shape.name : `${shape.name}: ≈ ${f.format(n)} ${t('visitors')}`;
    path.appendChild(title);
    if (n !== undefined && view.drill && !$('country').value) {
      path.addEventListener('click', () => { state.geoCountry = code; loadView(view); });
    }
    svg.appendChild(path);
  }
  box.textContent = '';
  box.appendChild(svg);
}

function sortedRows(view, report) {
  const rows = [...(report.rows || [])];
  if (!view.timed && !view.keepOrder) {
    const m = view.measures[0];
    rows.sort((a, b) => (b[m] ?? -1) - (a[m] ?? -1));
  }
  return rows;
}

function render(view) {
  const section = $(`view-${view.id}`);
  const report = state.reports[view.id];
  section.querySelector('h2').textContent = t(`view_${view.id}`);
  section.querySelector('button.csv').textContent = t('csv');
  const crumb = section.querySelector('.crumb');
  crumb.textContent = '';
  if (view.drill && state.geoCountry && !$('country').value) {
    const back = document.createElement('a');
    back.className = 'drill';
    back.textContent = `${t('all_countries')} ›`;
    back.addEventListener('click', () => { state.geoCountry = ''; loadView(view); });
    crumb.append(back, ` ${t('regions_of')} ${state.geoCountry}`);
  }
  if (!report) return;
  const rows = sortedRows(view, report);
  const shown = rows;
  const empty = section.querySelector('.empty');
  empty.hidden = shown.length > 0 && !report.error;
  empty.textContent = report.error || t('no_data');
  drawTotals(view, section, report);
  drawMap(view, section, report);
  drawChart(view, section, view.timed ? rows : shown.slice(0, 15), report);
  drawTable(view, section, report, rows);
}

function drawChart(view, section, rows, report) {
  const canvas = section.querySelector('canvas');
  if (state.charts[view.id]) state.charts[view.id].destroy();
  const rtl = state.lang === 'ar';
  const datasets = view.measures.map((m, i) => ({
    label: t(m), data: rows.map((r) => r[m] ?? null), borderColor: COLOURS[i], backgroundColor: COLOURS[i],
    spanGaps: false, tension: 0.2,
  }));
  // over time, the compared period drawn under it, each period under the one it is compared
  // with (dashed; a gap where either was not released)
  if (view.timed && report && report.compare) {
    view.measures.forEach((m, i) => datasets.push({
      label: `${t(m)} (${t(report.compare.with)})`, data: rows.map((r) => (r.change && r.change[m] ? r.change[m].previous : null)),
      borderColor: `${COLOURS[i]}88`, backgroundColor: `${COLOURS[i]}44`, borderDash: [5, 4], spanGaps: false, tension: 0.2,
    }));
  }
  state.charts[view.id] = new Chart(canvas, {
    type: view.kind,
    data: { labels: rows.map(view.label), datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, locale: state.lang,
      plugins: { legend: { rtl, position: 'bottom' }, tooltip: { rtl } },
      scales: { x: { reverse: rtl && view.timed }, y: { beginAtZero: true, position: rtl ? 'right' : 'left' } },
      onClick: view.drill ? (_, elements) => drill(view, rows, elements) : undefined,
    },
  });
}

function drill(view, rows, elements) {
  if (!elements.length || state.geoCountry || $('country').value) return;
  const row = rows[elements[0].index];
  if (row && row.country) { state.geoCountry = row.country; loadView(view); }
}

function drawTable(view, section, report, rows) {
  const { dims, measures } = columnsOf(view, report);
  const head = section.querySelector('thead');
  const body = section.querySelector('tbody');
  head.textContent = '';
  body.textContent = '';
  const tr = document.createElement('tr');
  for (const c of [...dims, ...measures]) {
    const th = document.createElement('th');
    th.textContent = t(c);
    tr.appendChild(th);
  }
  head.appendChild(tr);
  for (const r of rows) {
    const row = document.createElement('tr');
    for (const d of dims) {
      const td = document.createElement('td');
      const text = d === 'period' ? view.label(r) : d === 'page_category' ? categoryName(r[d]) : d === 'gender' ? genderName(r[d])
        : d === 'channel' ? channelName(r[d]) : (r[d] ?? '—');
      if (view.drill && d === 'country' && !state.geoCountry && !$('country').value && r.country) {
        const a = document.createElement('a');
        a.className = 'drill';
        a.textContent = text;
        a.addEventListener('click', () => { state.geoCountry = r.country; loadView(view); });
        td.appendChild(a);
      } else {
        td.textContent = text;
        if (d === 'page_path') td.dir = 'ltr';
      }
      row.appendChild(td);
    }
    for (const m of measures) {
      const td = document.createElement('td');
      td.className = 'num';
      const ci95 = r.ci95 ? r.ci95[m] : 0;
      td.textContent = formatNumber(r[m], m, ci95);
      if (!RATES.includes(m)) {
        td.title = intervalOf(r[m], ci95);
        td.dataset.ci95 = String(ci95 || 0);
        const badge = changeBadge(r.change && r.change[m]);
        if (badge) td.append(' ', badge);
      }
      row.appendChild(td);
    }
    body.appendChild(row);
  }
}

// The live view: the last 30 minutes from the processor's memory, asked again every few
// seconds (its cells never change once ended, so asking again spends nothing more).
const LIVE_REFRESH_MS = 5000;

function startLive() {
  stopLive();
  $('live').hidden = false;
  loadLive();
  state.liveTimer = setInterval(loadLive, LIVE_REFRESH_MS);
}

function stopLive() {
  if (state.liveTimer) clearInterval(state.liveTimer);
  state.liveTimer = null;
  state.live = null;
  if (state.charts.live) { state.charts.live.destroy(); delete state.charts.live; }
  $('live').hidden = true;
}

async function loadLive() {
  try {
    state.live = await api('/v1/live?limit=10');
  } catch (e) {
    state.live = { error: e.status === 503 ? t('live_unavailable') : `${t('error')}: ${e.message}` };
    // not served here, not this key's, or its budget spent: asking every few seconds would not help
    if ([401, 403, 429, 503].includes(e.status)) {
      if (state.liveTimer) clearInterval(state.liveTimer);
      state.liveTimer = null;
    }
  }
  renderLive();
  $('live').dataset.loaded = String(Number($('live').dataset.loaded || 0) + 1);
}

function renderLive() {
  const section = $('live');
  const live = state.live;
  section.querySelector('h2').textContent = t('view_live');
  if (!live) return;
  const empty = section.querySelector('.empty');
  const box = section.querySelector('.totals');
  box.textContent = '';
  empty.hidden = !live.error;
  empty.textContent = live.error || '';
  if (live.error) return;
  const total = live.total;
  for (const [m, label] of [['visitors', 'live_visitors'], ['page_views', 'live_page_views']]) {
    const item = document.createElement('span');
    item.className = 'total';
    item.dataset.measure = m;
    item.textContent = total ? `${t(label)}: ${formatNumber(total[m], m, total.ci95[m])}` : `${t(label)}: ${t('live_held_back')}`;
    if (total) item.title = intervalOf(total[m], total.ci95[m]);
    box.appendChild(item);
  }
  const minutes = live.per_minute || [];
  const rtl = state.lang === 'ar';
  const timeOf = (iso) => new Date(iso).toLocaleTimeString(state.lang, { hour: '2-digit', minute: '2-digit' });
  const labels = minutes.map((r) => timeOf(r.minute));
  const values = minutes.map((r) => r.page_views ?? null);
  const chart = state.charts.live;
  if (chart && chart.options.locale === state.lang) {
    // every few seconds: the same chart, new numbers
    chart.data.labels = labels;
    chart.data.datasets[0].data = values;
    chart.update('none');
  } else {
    if (chart) chart.destroy();
    state.charts.live = new Chart(section.querySelector('canvas'), {
      type: 'bar',
      data: { labels, datasets: [{ label: t('page_views'), data: values, backgroundColor: COLOURS[0] }] },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false, locale: state.lang,
        plugins: { legend: { rtl, position: 'bottom' }, tooltip: { rtl } },
        scales: { x: { reverse: rtl }, y: { beginAtZero: true, position: rtl ? 'right' : 'left' } },
      },
    });
  }
  const head = section.querySelector('thead');
  const body = section.querySelector('tbody');
  head.textContent = '';
  body.textContent = '';
  const tr = document.createElement('tr');
  for (const c of ['page_path', 'page_views', 'visitors']) {
    const th = document.createElement('th');
    th.textContent = t(c);
    tr.appendChild(th);
  }
  head.appendChild(tr);
  for (const r of live.pages || []) {
    const row = document.createElement('tr');
    const path = document.createElement('td');
    path.textContent = r.page_path;
    path.dir = 'ltr';
    row.appendChild(path);
    for (const m of ['page_views', 'visitors']) {
      const td = document.createElement('td');
      td.className = 'num';
      td.textContent = formatNumber(r[m], m, r.ci95[m]);
      td.title = intervalOf(r[m], r.ci95[m]);
      row.appendChild(td);
    }
    body.appendChild(row);
  }
}

function csvField(value) {
  if (value === null || value === undefined) return '';
  let text = String(value);
  // a text cell a spreadsheet would run as a formula (ids and paths come from the public ingest)
  if (typeof value === 'string' && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

// The CSV of a view as shown: its dimensions, the released measures and each one's 95% interval.
function csv(viewId) {
  const view = views.find((v) => v.id === viewId);
  const report = state.reports[viewId];
  if (!view || !report) return '';
  const { dims, measures } = columnsOf(view, report);
  const intervals = measures.filter((m) => !RATES.includes(m));
  const header = [...dims, ...measures, ...intervals.map((m) => `${m}_ci95`)];
  const lines = [header.map(csvField).join(',')];
  for (const r of sortedRows(view, report)) {
    const values = [...dims, ...measures].map((c) => r[c]);
    const widths = intervals.map((m) => (r.ci95 ? r.ci95[m] : 0));
    lines.push([...values, ...widths].map(csvField).join(','));
  }
  return `${lines.join('\r\n')}\r\n`;
}

function download(viewId) {
  const blob = new Blob([csv(viewId)], { type: 'text/csv;charset=utf-8' });
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = `marsad-${viewId}-${$('from').value}-${$('to').value}.csv`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

document.addEventListener('DOMContentLoaded', () => {
  buildViews();
  initDates();
  applyLanguage();
  $('language').addEventListener('click', () => {
    state.lang = state.lang === 'ar' ? 'en' : 'ar';
    localStorage.setItem('marsad.lang', state.lang);
    applyLanguage();
  });
  $('sign-out').addEventListener('click', signOut);
  $('sign-in-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    $('sign-in-error').textContent = '';
    signIn($('api-key').value.trim()).catch((e) => {
      $('sign-in-error').textContent = e.status === 401 || e.status === 403 ? t('bad_key') : `${t('error')}: ${e.message}`;
    });
  });
  $('controls').addEventListener('submit', (ev) => {
    ev.preventDefault();
    if ($('from').value > $('to').value) {
      $('status').textContent = `${t('from')} > ${t('to')}`;
      return;
    }
    loadAll();
  });
  if (state.key) signIn(state.key).catch(signOut);
});

// for tests and for people who script the dashboard from the console
window.marsadDashboard = { csv, state, views: VIEWS.map((v) => v.id) };
