// Send track events through the official Node SDK (@segment/analytics-node,
// unchanged), one client per write key, to a cell router: the cells
// topology test's Node workspaces.
//
// Usage: node node_cells.mjs HOST COUNT KEY=PREFIX [KEY=PREFIX ...]
// Prints one JSON object per event ({"messageId", "key"}); exits non-zero if
// any client reported an error. SLUICE_SDK_PACE_MS (default 0) spaces the
// events out, so a run can span a migration's cutover.
import { createRequire } from 'node:module'
import path from 'node:path'

const require = createRequire(path.join(process.env.SLUICE_NODE_MODULES, 'x.js'))
const { Analytics } = require('@segment/analytics-node')

const [host, countArg, ...pairs] = process.argv.slice(2)
const count = Number(countArg)
const pace = Number(process.env.SLUICE_SDK_PACE_MS ?? 0)
const errors = []
const clients = []
const sent = []
for (const pair of pairs) {
  const [writeKey, prefix] = pair.split('=')
  const analytics = new Analytics({ writeKey, host, maxEventsInBatch: 25, flushInterval: 200, maxRetries: 5 })
  analytics.on('error', (err) => errors.push(`${writeKey}: ${String(err?.reason ?? err?.message ?? JSON.stringify(err))}`))
  clients.push(analytics)
  for (let i = 0; i < count; i++) {
    const messageId = `${prefix}-${i}`
    analytics.track({ userId: `user-${i}`, event: 'Cell Test', properties: { i }, messageId })
    sent.push({ messageId, key: writeKey })
    if (pace) await new Promise((resolve) => setTimeout(resolve, pace))
  }
}
await Promise.all(clients.map((c) => c.closeAndFlush({ timeout: 60000 })))
for (const s of sent) console.log(JSON.stringify(s))
if (errors.length) {
  console.error('SDK errors: ' + errors.slice(0, 20).join('; '))
  process.exit(1)
}
