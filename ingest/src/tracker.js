/* Marsad tracker (served at /s.js). No dependencies.
 * Include with <script async src="https://collect.example/s.js"></script>.
 * The site states consent in window.marsadConsent = {analytics, personalisation, marketing}
 * (analytics defaults to true, the others to false); GPC or DNT turn personalisation and
 * marketing off before anything is sent. data-manual on the script tag stops the automatic
 * page view. API: marsad.pageView(), marsad.track(type, {ad, props, identity}), marsad.optOut(scope).
 * A logged-in visitor counts as such only with `identity`, a token the site's backend signed
 * (user id, expiry, declared demographics); window.marsadIdentity is used when set.
 */
(function (w, d) {
  'use strict';
  var script = d.currentScript;
  var base = (script && script.getAttribute('data-endpoint')) || (script && script.src ? new URL(script.src).origin : '');
  var COOKIE = '_mid', OPTOUT = '_mid_optout', YEAR = 31536000;

  function readCookie(name) {
    var parts = d.cookie ? d.cookie.split('; ') : [];
    for (var i = 0; i < parts.length; i++) {
      var kv = parts[i].split('=');
      if (kv[0] === name) return decodeURIComponent(kv.slice(1).join('='));
    }
    return null;
  }
  function writeCookie(name, value) {
    d.cookie = name + '=' + encodeURIComponent(value) + '; path=/; max-age=' + YEAR + '; SameSite=Lax';
  }
  function randomHex(bytes) {
    var a = new Uint8Array(bytes);
    (w.crypto || w.msCrypto).getRandomValues(a);
    return Array.prototype.map.call(a, function (b) { return ('0' + b.toString(16)).slice(-2); }).join('');
  }
  function privacySignal() {
    return navigator.globalPrivacyControl === true || navigator.doNotTrack === '1' || w.doNotTrack === '1';
  }
  function optedOut(scope) {
    var s = readCookie(OPTOUT) || '';
    return s.indexOf('all') >= 0 || s.indexOf('analytics') >= 0 || (scope && s.indexOf(scope) >= 0);
  }
  function consent() {
    var c = w.marsadConsent || {};
    var signal = privacySignal();
    return {
      analytics: c.analytics !== false && !optedOut('analytics'),
      personalisation: c.personalisation === true && !signal && !optedOut('personalisation'),
      marketing: c.marketing === true && !signal && !optedOut('marketing')
    };
  }
  function cookieId() {
    var id = readCookie(COOKIE);
    if (!id) {
      id = 'c-' + randomHex(16);
      writeCookie(COOKIE, id);
    }
    return id;
  }

  function track(type, extra) {
    var c = consent();
    if (!c.analytics) return false;
    extra = extra || {};
    var ev = {
      type: type,
      url: w.location.href,
      cookie_id: cookieId(),
      event_id: 'e-' + randomHex(12),
      ts: new Date().toISOString(),
      consent: c
    };
    if (d.referrer) ev.referrer = d.referrer;
    if (extra.ad) ev.ad = extra.ad;
    if (extra.props) ev.props = extra.props;
    var identity = extra.identity || w.marsadIdentity;
    if (identity) ev.identity = identity;
    var body = JSON.stringify(ev);
    if (navigator.sendBeacon && navigator.sendBeacon(base + '/v1/events', new Blob([body], { type: 'text/plain' }))) {
      return true;
    }
    var img = new Image(1, 1);
    img.src = base + '/v1/p.gif?t=' + encodeURIComponent(type) + '&u=' + encodeURIComponent(ev.url) +
      '&r=' + encodeURIComponent(d.referrer || '') + '&e=' + ev.event_id + '&c=' + encodeURIComponent(ev.cookie_id);
    return true;
  }

  function optOut(scope) {
    scope = scope || 'all';
    var previous = readCookie(OPTOUT);
    writeCookie(OPTOUT, previous ? previous + ',' + scope : scope);
    cookieId();
    // the opt-out applies to the `_mid` cookie the request carries (served from the site's own
    // origin, it is this one); text/plain keeps it a simple request (no preflight)
    var body = JSON.stringify({ scope: scope });
    return fetch(base + '/v1/opt-outs', { method: 'POST', body: body, keepalive: true, mode: 'no-cors', credentials: 'include',
      headers: { 'Content-Type': 'text/plain' } }).then(function () { return true; }, function () { return false; });
  }

  w.marsad = { track: track, pageView: function () { return track('page_view'); }, optOut: optOut, consent: consent };
  if (!(script && script.hasAttribute('data-manual'))) track('page_view');
})(window, document);
