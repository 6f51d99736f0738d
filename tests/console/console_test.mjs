// Drives the web console in headless Chromium (Debian's chromium, via
// playwright-core) against a running `sluice serve`:
//   node console_test.mjs <admin http://host:port> <token> <messageId> <screenshot dir>
// Checks that every page loads, the charts draw live data, pause/resume works
// end to end (verified through the API), the debugger and the inspector show
// the event, a tracking plan saved from its page shows in the debugger, a function deployed, tested and rolled back from its page; saves a screenshot of each page. Prints one JSON line of results.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.SLUICE_BROWSER_MODULES, "x.js"));
const { chromium } = require("playwright-core");

const [admin, token, messageId, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.SLUICE_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const results = {};
const qos = async () => (await (await fetch(`${admin}/api/qos`, { headers: { Authorization: `Bearer ${token}` } })).json());
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(admin)) external.push(r.url()); });
  await page.goto(`${admin}/console#overview`);
  await page.fill("#token", token);
  await page.click("#save-token");
  // Overview: live charts with at least 3 points, and numbers filled in.
  await page.waitForSelector('#chart-rates[data-points]:not([data-points="0"]):not([data-points="1"]):not([data-points="2"])', { timeout: 20000 });
  results.overview_points = Number(await page.getAttribute("#chart-rates", "data-points"));
  results.success_card = await page.textContent("#m-success");
  await page.screenshot({ path: `${shots}/overview.png` });

  // Destinations: pause then resume, checked through the API.
  await page.click('a[data-page="destinations"]');
  await page.waitForSelector('tr[data-destination="hook"] button', { timeout: 10000 });
  await page.click('tr[data-destination="hook"] button.pause');
  await page.waitForSelector('tr[data-destination="hook"] button.resume', { timeout: 10000 });
  results.paused_via_api = (await qos()).find((q) => q.destination === "hook").paused;
  results.success_rate_cell = await page.textContent('tr[data-destination="hook"] td:nth-child(2)');
  await page.screenshot({ path: `${shots}/destinations.png` });
  await page.click('tr[data-destination="hook"] button.resume');
  await page.waitForSelector('tr[data-destination="hook"] button.pause', { timeout: 10000 });
  results.resumed_via_api = !(await qos()).find((q) => q.destination === "hook").paused;

  // Event debugger: the latest events of source web.
  await page.click('a[data-page="debugger"]');
  await page.waitForSelector("#dbg-rows tr", { timeout: 10000 });
  results.debugger_rows = await page.locator("#dbg-rows tr").count();
  results.debugger_has_event = (await page.textContent("#dbg-rows")).includes("Console Test");
  results.debugger_markup_escaped =
    (await page.locator("#dbg-rows b.injected").count()) === 0 && (await page.textContent("#dbg-rows")).includes("<b class=injected>");
  await page.screenshot({ path: `${shots}/debugger.png` });

  // Delivery inspector: the event's transitions.
  await page.click('a[data-page="inspector"]');
  await page.fill("#insp-key", messageId);
  await page.click("#insp-form button");
  await page.waitForSelector("#insp-out td.state-succeeded", { timeout: 10000 });
  results.inspector_states = await page.locator("#insp-out tbody td:nth-child(3)").allTextContents();
  await page.screenshot({ path: `${shots}/inspector.png` });
  // Tracking plans: a plan saved from the page (every event unplanned, flagged) is stored, and
  // the debugger then shows each event's violation.
  await page.click('a[data-page="plans"]');
  await page.waitForFunction(() => document.querySelector("#plan-status").textContent.length > 0, null, { timeout: 10000 });
  await page.fill("#plan-json", JSON.stringify({ name: "console", unplanned: "flag", invalid: "flag", track: {} }));
  await page.click("#plan-save");
  await page.waitForFunction(() => document.querySelector("#plan-status").textContent.startsWith("version 1"), null, { timeout: 10000 });
  const stored = await (await fetch(`${admin}/api/sources/web/tracking-plan`, { headers: { Authorization: `Bearer ${token}` } })).json();
  results.plan_saved = stored.version === 1 && stored.plan.unplanned === "flag";
  await page.screenshot({ path: `${shots}/plans.png` });
  await page.click('a[data-page="debugger"]');
  await page.waitForSelector("#dbg-rows td.plan.error", { timeout: 10000 });
  results.debugger_plan_cell = await page.textContent("#dbg-rows td.plan.error");
  // Functions: deploy two versions from the page, test the live one, make the first live again.
  const auth = { headers: { Authorization: `Bearer ${token}` } };
  await page.click('a[data-page="functions"]');
  await page.waitForFunction(() => document.querySelector("#fn-status").textContent.length > 0, null, { timeout: 10000 });
  const fn = (v) => `async function onTrack(e) { e.properties = e.properties || {}; e.properties.v = ${v}; return e; }`;
  for (const v of [1, 2]) {
    if (v === 1) await page.fill("#fn-new", "console-fn");
    await page.fill("#fn-code", fn(v));
    await page.click("#fn-deploy");
    await page.waitForFunction((v) => document.querySelector("#fn-status").textContent.startsWith(`live: version ${v}`), v, { timeout: 10000 });
  }
  await page.click("#fn-test");
  await page.waitForFunction(() => document.querySelector("#fn-result").textContent.includes('"outcome"'), null, { timeout: 10000 });
  results.function_test = JSON.parse(await page.textContent("#fn-result"));
  await page.click("#fn-versions button.restore");
  await page.waitForFunction(() => document.querySelector("#fn-status").textContent.startsWith("live: version 1"), null, { timeout: 10000 });
  results.function_live_after_restore = (await (await fetch(`${admin}/api/functions/console-fn`, auth)).json()).version;
  await page.screenshot({ path: `${shots}/functions.png` });
  results.external_requests = external;
  console.log(JSON.stringify(results));
} finally {
  await browser.close();
}
