// Send every Segment call type through the official Node SDK
// (@segment/analytics-node, unchanged) to a Sluice server.
//
// Usage: node node_sdk.mjs HOST WRITE_KEY RUN_ID COUNT
// Prints one JSON object per line for each event it sent; exits non-zero if
// the SDK reported an error.
import { createRequire } from 'node:module'
import path from 'node:path'

const require = createRequire(path.join(process.env.SLUICE_NODE_MODULES, 'x.js'))
const { Analytics } = require('@segment/analytics-node')

const [host, writeKey, runId, countArg] = process.argv.slice(2)
const count = Number(countArg)
const errors = []
const analytics = new Analytics({ writeKey, host, maxEventsInBatch: 25, flushInterval: 200, maxRetries: 3 })
analytics.on('error', (err) => errors.push(String(err?.reason ?? err?.message ?? JSON.stringify(err))))

const sent = []
for (let i = 0; i < count; i++) {
  const base = `node-${runId}-${i}`
  const userId = `user-${i}`
  const calls = {
    identify: (m) => analytics.identify({ userId, traits: { email: `u${i}@example.com` }, messageId: m, timestamp: new Date('2024-05-01T12:00:00.123Z') }),
    track: (m) => analytics.track({ userId, event: 'Order Completed', properties: { total: i + 0.5, items: [1, 2] }, messageId: m }),
    page: (m) => analytics.page({ userId, category: 'Docs', name: 'Install', properties: { path: '/install' }, messageId: m }),
    screen: (m) => analytics.screen({ userId, category: 'App', name: 'Home', properties: { tab: 3 }, messageId: m }),
    group: (m) => analytics.group({ userId, groupId: `group-${i}`, traits: { seats: 10 }, messageId: m }),
    alias: (m) => analytics.alias({ userId, previousId: `anon-${i}`, messageId: m }),
  }
  for (const [kind, call] of Object.entries(calls)) {
    const messageId = `${base}-${kind}`
    call(messageId)
    sent.push({ messageId, type: kind, userId, i })
  }
}
await analytics.closeAndFlush({ timeout: 20000 })
for (const s of sent) console.log(JSON.stringify(s))
if (errors.length) {
  console.error('SDK errors: ' + errors.join('; '))
  process.exit(1)
}
