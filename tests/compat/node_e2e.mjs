// Send COUNT events through the official Node SDK (@segment/analytics-node,
// unchanged) to a Sluice server, for the delivery end-to-end test: track,
// identify, page and screen calls with explicit messageIds, and every
// RESEND_EVERY-th event sent a second time at the end with the same
// messageId and the same fields (a client retry).
//
// Usage: node node_e2e.mjs HOST WRITE_KEY RUN_ID COUNT RESEND_EVERY
// Prints one JSON object per line for each unique event it sent: messageId,
// type, userId, the fields the webhook must receive (event, properties or
// traits) and `resent`. Exits non-zero if the SDK reported an error.
import { createRequire } from 'node:module'
import path from 'node:path'

const require = createRequire(path.join(process.env.SLUICE_NODE_MODULES, 'x.js'))
const { Analytics } = require('@segment/analytics-node')

const [host, writeKey, runId, countArg, resendArg] = process.argv.slice(2)
const count = Number(countArg)
const resendEvery = Number(resendArg)
const errors = []
const analytics = new Analytics({ writeKey, host, maxEventsInBatch: 25, flushInterval: 200, maxRetries: 3 })
analytics.on('error', (err) => errors.push(String(err?.reason ?? err?.message ?? JSON.stringify(err))))
const timestamp = new Date('2024-05-01T12:00:00.123Z')

function call(s) {
  const { messageId, userId } = s
  switch (s.type) {
    case 'track':
      return analytics.track({ userId, event: s.event, properties: s.properties, messageId, timestamp })
    case 'identify':
      return analytics.identify({ userId, traits: s.traits, messageId, timestamp })
    case 'page':
      return analytics.page({ userId, name: 'Install', properties: s.properties, messageId, timestamp })
    case 'screen':
      return analytics.screen({ userId, name: 'Home', properties: s.properties, messageId, timestamp })
    default:
      throw new Error(s.type)
  }
}

const sent = []
for (let i = 0; i < count; i++) {
  const type = ['track', 'identify', 'page', 'screen'][i % 4]
  const s = { messageId: `node-e2e-${runId}-${i}`, type, userId: `node-user-${i}`, i, resent: i % resendEvery === 0 }
  if (type === 'track') {
    s.event = 'Order Completed'
    s.properties = { total: i + 0.5, items: [1, 2, { sku: `sku-${i}` }], note: 'h\u00e9llo \u2603', paid: true }
  } else if (type === 'identify') {
    s.traits = { email: `u${i}@example.com`, plan: 'pro', seats: i }
  } else if (type === 'page') {
    s.properties = { path: `/install/${i}`, referrer: null }
  } else {
    s.properties = { tab: i % 7, flags: { dark: false } }
  }
  call(s)
  sent.push(s)
}

// The client retries: the same calls again, same messageIds, in later batches.
const resent = sent.filter((s) => s.resent)
for (const s of resent) call(s)

await analytics.closeAndFlush({ timeout: 30000 })
for (const s of sent) console.log(JSON.stringify(s))
console.error(`${sent.length} events, ${resent.length} sent twice`)
if (errors.length) {
  console.error('SDK errors: ' + errors.join('; '))
  process.exit(1)
}
