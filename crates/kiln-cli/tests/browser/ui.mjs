// Kiln's web UI in Debian's Chromium, driven by playwright-core. Started by
// crates/kiln-cli/tests/ui.rs, which prepares the runs and the server and passes:
//   KILN_UI_URL, KILN_UI_TOKEN (may change things), KILN_UI_READ_TOKEN (read-only),
//   KILN_UI_PIPELINE (the image pipeline's flow run), KILN_UI_SLOW (a running flow run to
//   cancel), KILN_UI_FAILED (a failed deployment run to retry), KILN_UI_SHOTS (a folder).
// It prints "start-live-flow" when the runs page is open and waits for a new flow run to
// appear on it and turn Completed without a reload. Exit code 0: every check passed.
import { chromium } from "playwright-core";
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(import.meta.url);
const axePath = require.resolve("axe-core/axe.min.js");
const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("KILN_UI_URL");
const shots = env("KILN_UI_SHOTS");
fs.mkdirSync(shots, { recursive: true });

let failures = 0;
function check(ok, what) {
  console.log(`${ok ? "ok" : "FAILED"}: ${what}`);
  if (!ok) failures++;
}

async function shoot(page, name) {
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

// No serious or critical accessibility violation on the page.
async function accessible(page, name) {
  await page.addScriptTag({ path: axePath });
  const result = await page.evaluate(async () => await window.axe.run(document, { resultTypes: ["violations"] }));
  const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  for (const v of bad) {
    console.log(`  axe ${v.impact} ${v.id}: ${v.help} (${v.nodes.slice(0, 3).map((n) => n.target.join(" ")).join("; ")})`);
  }
  check(bad.length === 0, `${name}: no serious accessibility violation (axe-core)`);
}

async function login(browser, token) {
  const context = await browser.newContext({ bypassCSP: true, viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on("dialog", (d) => d.accept());
  await page.goto(`${base}/runs`);
  check(new URL(page.url()).pathname === "/login", "a page asks for a login when the server has tokens");
  await page.fill("#token", token);
  await Promise.all([page.waitForURL((u) => u.pathname === "/runs"), page.click("form.login button")]);
  return { context, page };
}

const browser = await chromium.launch({
  executablePath: process.env.KILN_UI_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  // The login page itself.
  {
    const context = await browser.newContext({ bypassCSP: true });
    const page = await context.newPage();
    await page.goto(`${base}/login`);
    await shoot(page, "login");
    await accessible(page, "login page");
    await page.fill("#token", "not-a-token");
    await page.click("form.login button");
    check((await page.locator(".alert").textContent()).includes("unknown"), "a wrong token is refused, saying so");
    await context.close();
  }

  const { context, page } = await login(browser, env("KILN_UI_TOKEN"));

  // Click-through: runs list -> the pipeline's flow run -> make_image -> its picture.
  const pipeline = env("KILN_UI_PIPELINE");
  await shoot(page, "runs");
  await accessible(page, "runs page");
  await page.click(`tr[data-run="${pipeline}"] a[href="/runs/${pipeline}"]`);
  await page.waitForURL(`**/runs/${pipeline}`);
  check(await page.locator("svg.graph .node").count() === 2, "the pipeline's graph has two nodes");
  check(await page.locator("svg.graph .edge").count() === 1, "the pipeline's graph has one edge");
  check(await page.locator("svg.timeline .row").count() === 2, "the timeline has a row per task run");
  check(await page.locator("ol.logs li").count() > 0, "the flow run's logs are shown");
  check(await page.locator("ol.logs li").first().isVisible(), "the logs are visible");
  await shoot(page, "flow-run");
  await accessible(page, "flow run page");
  await page.click('table.task-runs a:text-is("make_image")');
  await page.waitForURL("**/task-runs/**");
  const image = page.locator("#result-image");
  await image.scrollIntoViewIfNeeded();
  await page.waitForFunction(() => {
    const img = document.querySelector("#result-image");
    return img && img.complete && img.naturalWidth > 0;
  }, null, { timeout: 20000 });
  const natural = await image.evaluate((img) => img.naturalWidth);
  check(natural === 512, `make_image's preview is a loaded picture 512 pixels wide (natural width ${natural})`);
  check((await page.locator(".verified").textContent()).includes("hash verified"), "the result's hash is verified");
  check((await page.locator(".result-meta").textContent()).includes("png"), "the result's serializer is shown");
  await shoot(page, "task-run");
  await accessible(page, "task run page");
  // A live refresh of a finished run's page does not read its result again.
  const again = await page.request.get(page.url(), { headers: { "X-Kiln-Live": "1", "X-Kiln-Final": "result" } });
  const fresh = await page.request.get(page.url(), { headers: { "X-Kiln-Live": "1" } });
  check(!(await again.text()).includes('id="result"') && (await fresh.text()).includes('id="result"'),
    "a live refresh leaves out a finished result the page holds already");

  // A subflow folds out; a retried task shows its attempts on the timeline.
  await page.goto(`${base}/runs/${env("KILN_UI_NESTED")}`);
  const subflow = page.locator("details.subflow");
  check(await subflow.count() === 1, "the subflow is listed under the graph");
  check(!(await subflow.locator("svg.graph").isVisible()), "the subflow is folded at first");
  await subflow.locator("summary").click({ position: { x: 5, y: 5 } });
  check(await subflow.locator("svg.graph .node").count() === 1 && await subflow.locator("svg.graph").isVisible(),
    "the subflow folds out to its own graph");
  check(await page.locator("svg.timeline rect.retried").count() === 1, "the failed attempt is drawn apart on the timeline");
  check(await page.locator("svg.timeline g.row", { hasText: "wobbly" }).locator("rect.span").count() === 2,
    "the retried task run's row shows its two attempts");
  await shoot(page, "flow-run-nested");

  // A request that changes something without the session's CSRF token is refused.
  const forged = await page.request.post(`${base}/runs/${pipeline}/cancel`, { form: { csrf: "forged" } });
  check(forged.status() === 403, `a change without the CSRF token is refused (status ${forged.status()})`);

  // Live: a flow started after the page opened appears and turns Completed, no reload.
  await page.goto(`${base}/runs`);
  await page.evaluate(() => { window.kilnNoReload = true; });
  const before = new Set(await page.locator("tr[data-run]").evaluateAll((rows) => rows.map((r) => r.dataset.run)));
  console.log("start-live-flow");
  const appeared = await page.waitForFunction((known) => {
    return [...document.querySelectorAll("tr[data-run]")].some(
      (r) => !known.includes(r.dataset.run) && r.dataset.state === "Completed");
  }, [...before], { timeout: 60000 }).then(() => true, () => false);
  check(appeared, "a flow run started after the page opened appears and turns Completed");
  check(await page.evaluate(() => window.kilnNoReload === true), "the runs page was not reloaded");
  await shoot(page, "runs-live");

  // Cancel: the running flow run goes to Cancelling, then Cancelled.
  const slow = env("KILN_UI_SLOW");
  await page.goto(`${base}/runs/${slow}`);
  check(await page.locator("#run-head .state").textContent() === "Running", "the slow flow run is Running");
  await Promise.all([page.waitForURL(`**/runs/${slow}`), page.click('button:text-is("Cancel")')]);
  const cancelled = await page.waitForFunction(() => document.querySelector("#run-head .state")?.textContent === "Cancelled",
    null, { timeout: 30000 }).then(() => true, () => false);
  check(cancelled, "the Cancel button cancels the running flow run (Cancelled, shown live)");
  await shoot(page, "flow-run-cancelled");

  // Retry: the failed deployment run is run again by the worker and completes.
  const failed = env("KILN_UI_FAILED");
  await page.goto(`${base}/runs/${failed}`);
  check(await page.locator("#run-head .state").textContent() === "Failed", "the deployment run is Failed");
  await Promise.all([page.waitForURL((u) => u.pathname.startsWith("/runs/") && !u.pathname.endsWith(failed)),
    page.click('button:text-is("Retry")')]);
  check((await page.locator("dl.facts").textContent()).includes(failed), "the new run names the run it retries");
  const retried = await page.waitForFunction(() => document.querySelector("#run-head .state")?.textContent === "Completed",
    null, { timeout: 60000 }).then(() => true, () => false);
  check(retried, "the Retry button starts a new run of the deployment, which completes");
  await shoot(page, "flow-run-retried");

  // A result whose record was damaged says so, in red.
  await page.goto(`${base}/task-runs/${env("KILN_UI_DAMAGED")}`);
  const alert = page.locator("#result .alert");
  check(await alert.count() === 1 && (await alert.textContent()).includes("does not verify"), "a damaged record is reported as not verifying");
  const colour = await alert.evaluate((el) => getComputedStyle(el).color);
  check(colour === "rgb(164, 14, 38)", `the report is red (${colour})`);
  check(await page.locator("#result-image").count() === 0, "no picture is shown for a damaged record");
  await shoot(page, "task-run-damaged");

  // Deployments: the schedule's next runs, and a run from the parameters form.
  await page.goto(`${base}/deployments`);
  check((await page.locator("table").textContent()).includes("cron 0 3 * * *"), "the deployments page shows the schedule");
  await shoot(page, "deployments");
  await accessible(page, "deployments page");
  await page.click('a:text-is("greet")');
  await page.waitForURL("**/deployments/greet");
  check(await page.inputValue("#p-times") === "2", "the form holds the deployment's default parameters");
  await page.fill("#p-times", "3");
  await page.click('button:text-is("Run greet")');
  check((await page.locator(".alert").textContent()).includes("name"), "a missing parameter is refused, naming it");
  check(await page.inputValue("#p-times") === "3", "the refused form keeps what was typed");
  await page.fill("#p-name", "ada");
  await Promise.all([page.waitForURL((u) => u.pathname.startsWith("/runs/")), page.click('button:text-is("Run greet")')]);
  check((await page.locator("pre.json").first().textContent()).includes("ada"), "the run has the form's parameters");
  const greeted = await page.waitForFunction(() => document.querySelector("#run-head .state")?.textContent === "Completed",
    null, { timeout: 60000 }).then(() => true, () => false);
  if (!greeted) {
    console.log("debug: state shown " + await page.locator("#run-head .state").textContent());
    await page.reload();
    console.log("debug: after reload " + await page.locator("#run-head .state").textContent());
  }
  check(greeted, "the run started from the form completes on the worker");
  // Its cached task's result is a serde value: shown as pretty JSON, its hash checked.
  await page.click('table.task-runs a:text-is("shout")');
  await page.waitForURL("**/task-runs/**");
  const json = page.locator("#result pre.preview");
  check(await json.count() === 1 && (await json.textContent()).includes('"ADA"'), "a serde result is shown as JSON");
  check(await page.locator('#result a:text-is("Download as JSON")').count() === 1, "with a link to download it");
  check((await page.locator("#result .verified").textContent()).includes("hash verified"), "its hash is checked");
  await shoot(page, "task-run-json");
  await page.goto(`${base}/deployments/greet`);
  await shoot(page, "deployment");
  await accessible(page, "deployment page");

  // Work pools: the pool and the worker's heartbeat.
  await page.goto(`${base}/work-pools`);
  check(await page.locator("#pool-ui").count() === 1, "the work pool is listed");
  check(await page.locator('span.state:text-is("alive")').count() > 0, "a live process is shown with its heartbeat");
  await shoot(page, "work-pools");
  await accessible(page, "work pools page");

  // Storages: the cached result of the greeting, deleted from the page.
  await page.goto(`${base}/storages`);
  const cached = page.locator("table.cache tr", { hasText: "shout" });
  check(await cached.count() === 1, "the cached result is listed with the task that produced it");
  await shoot(page, "storages");
  await accessible(page, "storages page");
  await Promise.all([page.waitForURL("**/storages**"), cached.locator('button:text-is("Delete")').click()]);
  check(await page.locator("table.cache tr", { hasText: "shout" }).count() === 0, "the Delete button deletes the cached result");

  // The dashboard.
  await page.goto(`${base}/dashboard`);
  check(await page.locator("svg.chart .bar").count() > 0, "the dashboard draws runs by state");
  check(await page.locator("#dash-failures tr", { hasText: "flaky" }).count() > 0, "the dashboard lists the failure");
  check(await page.locator("#dash-slowest tbody tr").count() > 0, "the dashboard lists the slowest task runs");
  await shoot(page, "dashboard");
  await accessible(page, "dashboard");
  await context.close();

  // A read-only token sees no button that changes something.
  const reader = await login(browser, env("KILN_UI_READ_TOKEN"));
  await reader.page.goto(`${base}/runs/${failed}`);
  check(await reader.page.locator('button:text-is("Retry")').count() === 0, "a read-only token sees no Retry button");
  check(await reader.page.locator('button:text-is("Cancel")').count() === 0, "a read-only token sees no Cancel button");
  check((await reader.page.locator(".who").textContent()).includes("read-only"), "the page says the token is read-only");
  await shoot(reader.page, "read-only");
  await reader.context.close();
} catch (e) {
  // Say where it stopped, and keep a picture of it.
  console.log(`FAILED: the browser test stopped: ${e.message.split("\n")[0]}`);
  for (const context of browser.contexts()) {
    for (const page of context.pages()) {
      console.log(`  open page: ${page.url()}`);
      await page.screenshot({ path: path.join(shots, "stopped.png"), fullPage: true }).catch(() => {});
    }
  }
  failures++;
} finally {
  await browser.close();
}
console.log(`screenshots: ${shots}`);
if (failures) {
  console.log(`${failures} check(s) failed`);
  process.exit(1);
}
console.log("all checks passed");
