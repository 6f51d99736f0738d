// Drives the control plane's Cells page in headless Chromium (Debian's
// chromium, via playwright-core) against a running `sluice control`:
//   node cells_page_test.mjs <control http://host:port> <token> <screenshot dir>
// Checks that without the token the page asks for it, that with it every
// cell is listed with its tier, state, load bars against the thresholds
// and its workspaces, that recent decisions and migrations are shown; saves a
// screenshot. Prints one JSON line of results.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.SLUICE_BROWSER_MODULES, "x.js"));
const { chromium } = require("playwright-core");

const [control, token, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.SLUICE_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const results = {};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(control)) external.push(r.url()); });
  await page.goto(`${control}/`);
  await page.waitForFunction(() => document.getElementById("message").textContent.includes("token"), null, { timeout: 10000 });
  results.asks_for_token = true;
  await page.fill("#token", token);
  await page.click("#save-token");
  await page.waitForSelector("#cells tr .bar", { timeout: 20000 });
  results.cells = await page.locator("#cells tr td:first-child").allTextContents();
  results.states = await page.locator("#cells tr td:nth-child(3)").allTextContents();
  results.load_labels = await page.locator("#cells tr .m").allTextContents();
  results.workspaces = await page.locator("#cells tr td:nth-child(5)").allTextContents();
  results.decisions = await page.locator("#decisions tr td:nth-child(2)").allTextContents();
  results.migration_workspaces = await page.locator("#migrations tr td:nth-child(2)").allTextContents();
  results.migration_phases = await page.locator("#migrations tr td:nth-child(4)").allTextContents();
  results.migration_buckets = await page.locator("#migrations tr td:nth-child(5)").allTextContents();
  await page.screenshot({ path: `${shots}/cells.png`, fullPage: true });
  results.external_requests = external;
  console.log(JSON.stringify(results));
} finally {
  await browser.close();
}
