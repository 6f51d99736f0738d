// Send every Segment call type through analytics.js (@segment/analytics-next,
// unchanged, its UMD build) in headless Chromium (Debian's chromium, driven by
// playwright-core), from a page served on another origin than Sluice's, so
// every request is a cross-origin one with a CORS preflight.
//
// Usage: node browser_sdk.mjs HOST WRITE_KEY RUN_ID COUNT [--batching]
//   HOST: Sluice's Tracking API, http://127.0.0.1:PORT
//   --batching: the Segment.io integration's batching delivery strategy
//   (POST /v1/b); without it one request per event (/v1/t, /v1/i, ...).
// Env: SLUICE_BROWSER_MODULES (node_modules with playwright-core and
// @segment/analytics-next), SLUICE_CHROMIUM.
//
// The page's origin (a static server started here, 127.0.0.1 on another
// port) serves the page, analytics.js's bundles (as its CDN: `_cdn`) and the
// source settings (`cdnURL`/v1/projects/<writeKey>/settings), so nothing is
// fetched from the internet. Prints one JSON object per line for each event
// sent (messageId, type, userId, i); exits non-zero if any browser request
// failed (network or CORS error), answered >= 400, went to a third origin,
// if the page logged an error, or if an event was not acknowledged by Sluice.
import { createRequire } from 'node:module'
import http from 'node:http'
import fs from 'node:fs'
import path from 'node:path'

const modules = process.env.SLUICE_BROWSER_MODULES
const require = createRequire(path.join(modules, 'x.js'))
const { chromium } = require('playwright-core')
const ajsDir = path.join(modules, '@segment/analytics-next')
const ajsVersion = JSON.parse(fs.readFileSync(path.join(ajsDir, 'package.json'), 'utf8')).version
const bundles = path.join(ajsDir, 'dist/umd')

const args = process.argv.slice(2)
const batching = args.includes('--batching')
const [host, writeKey, runId, countArg] = args.filter((a) => !a.startsWith('--'))
const count = Number(countArg)
const sluice = new URL(host)

const page_html = `<!doctype html>
<html><head><meta charset="utf-8"><title>A shop on another origin</title>
<script>window.analytics = { _cdn: location.origin }</script>
<script src="/analytics-next/bundles/index.js"></script>
</head><body><h1>Shop</h1></body></html>`

// What Segment's CDN answers for a source (trimmed): the Segment.io
// integration and no device-mode destinations. Remote metrics off (they go
// to <apiHost>/m, which Sluice does not serve).
const settings = {
  integrations: {
    'Segment.io': {
      apiKey: writeKey,
      apiHost: 'api.segment.io/v1',
      unbundledIntegrations: [],
      addBundledMetadata: true,
      maybeBundledConfigIds: {},
      versionSettings: { version: '4.4.7', componentTypes: ['browser'] },
    },
  },
  plan: { track: { __default: { enabled: true, integrations: {} } }, identify: { __default: { enabled: true } }, group: { __default: { enabled: true } } },
  enabledMiddleware: {},
  metrics: { sampleRate: 0 },
  legacyVideoPluginsEnabled: false,
  remotePlugins: [],
}

const served = []
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x')
  served.push(url.pathname)
  if (url.pathname === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' })
    return res.end(page_html)
  }
  if (url.pathname === '/favicon.ico') {
    res.writeHead(204)
    return res.end()
  }
  if (url.pathname === `/v1/projects/${writeKey}/settings`) {
    res.writeHead(200, { 'content-type': 'application/json' })
    return res.end(JSON.stringify(settings))
  }
  const m = url.pathname.match(/^\/analytics-next\/bundles\/([\w.-]+\.js)$/)
  if (m && fs.existsSync(path.join(bundles, m[1]))) {
    res.writeHead(200, { 'content-type': 'text/javascript' })
    return res.end(fs.readFileSync(path.join(bundles, m[1])))
  }
  res.writeHead(404)
  res.end()
})
await new Promise((r) => server.listen(0, '127.0.0.1', r))
const pageOrigin = `http://127.0.0.1:${server.address().port}`

const browser = await chromium.launch({
  executablePath: process.env.SLUICE_CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
})
const problems = []
const acked = new Map() // messageId -> times Sluice answered 200 for it
let sluiceRequests = 0
let code = 0
try {
  const context = await browser.newContext()
  const page = await context.newPage()
  page.on('request', (r) => {
    const o = new URL(r.url()).origin
    if (o === sluice.origin) sluiceRequests++
    else if (o !== pageOrigin) problems.push(`request to a third origin: ${r.method()} ${r.url()}`)
  })
  page.on('requestfailed', (r) => problems.push(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`))
  page.on('response', (r) => { if (r.status() >= 400) problems.push(`${r.status()} for ${r.request().method()} ${r.url()}`) })
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`) })
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`))
  page.on('requestfinished', async (r) => {
    if (new URL(r.url()).origin !== sluice.origin || r.method() !== 'POST') return
    const resp = await r.response()
    if (!resp || resp.status() !== 200) return
    let body
    try { body = JSON.parse(r.postData()) } catch (e) { problems.push(`unparsable body to ${r.url()}`); return }
    for (const ev of body.batch ?? [body]) acked.set(ev.messageId, (acked.get(ev.messageId) ?? 0) + 1)
  })

  await page.goto(`${pageOrigin}/`)
  const result = await page.evaluate(async ({ writeKey, apiHost, runId, count, batching }) => {
    const segment = { apiHost, protocol: 'http' }
    if (batching) segment.deliveryStrategy = { strategy: 'batching', config: { size: 10, timeout: 300 } }
    const [analytics] = await window.AnalyticsNext.AnalyticsBrowser.load(
      { writeKey, cdnURL: location.origin },
      { integrations: { 'Segment.io': segment } },
    )
    const sent = []
    const pending = []
    for (let i = 0; i < count; i++) {
      const userId = `user-${i}`
      const id = (kind) => `browser-${runId}-${i}-${kind}`
      const calls = {
        identify: (m) => analytics.identify(userId, { email: `u${i}@example.com` }, { messageId: m, timestamp: new Date('2024-05-01T12:00:00.123Z') }),
        track: (m) => analytics.track('Order Completed', { total: i + 0.5, items: [1, 2] }, { messageId: m, userId }),
        page: (m) => analytics.page('Docs', 'Install', { path: '/install' }, { messageId: m, userId }),
        screen: (m) => analytics.screen('App', 'Home', { tab: 3 }, { messageId: m, userId }),
        group: (m) => analytics.group(`group-${i}`, { seats: 10 }, { messageId: m, userId }),
        alias: (m) => analytics.alias(userId, `anon-${i}`, { messageId: m }),
      }
      for (const [type, call] of Object.entries(calls)) {
        const messageId = id(type)
        pending.push(call(messageId))
        sent.push({ messageId, type, userId, i })
      }
    }
    const ctxs = await Promise.all(pending)
    const failed = ctxs.map((c) => c.failedDelivery()).filter(Boolean).map((f) => String(f.reason))
    return { sent, failed }
  }, { writeKey, apiHost: `${sluice.host}/v1`, runId, count, batching })

  // Wait until Sluice acknowledged every event (batches flush on a timer).
  const deadline = Date.now() + 30000
  const missing = () => result.sent.filter((s) => !acked.has(s.messageId))
  while (missing().length && Date.now() < deadline && !problems.length) await new Promise((r) => setTimeout(r, 100))
  await new Promise((r) => setTimeout(r, 500)) // let a stray retry show
  for (const f of result.failed) problems.push(`analytics.js reported a failed delivery: ${f}`)
  if (missing().length) problems.push(`${missing().length} events never acknowledged, e.g. ${missing()[0].messageId}`)
  for (const [id, n] of acked) if (n > 1) problems.push(`${id} was sent ${n} times`)
  if (!served.includes(`/v1/projects/${writeKey}/settings`)) problems.push('analytics.js did not load its settings from the page origin')
  for (const s of result.sent) console.log(JSON.stringify(s))
  console.error(`analytics-next ${ajsVersion}: ${result.sent.length} events, ${sluiceRequests} requests to Sluice (${batching ? 'batching' : 'one per event'}), page origin ${pageOrigin}, Sluice ${sluice.origin}`)
} catch (e) {
  problems.push(`script error: ${e.stack ?? e}`)
} finally {
  await browser.close()
  server.close()
}
if (problems.length) {
  console.error('browser problems:\n' + problems.join('\n'))
  code = 1
}
process.exit(code)
