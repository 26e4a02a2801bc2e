// Drives the gateway's auditor page in headless Chromium (Debian `chromium`) with
// playwright-core: token, filter, table, record detail, inclusion proof, verification
// banner, and a full-page screenshot. Run by gateway/tests/auditor_page.rs:
//
//   node auditor_page.mjs <page url> <auditor token> <screenshot path>
//
// Prints one JSON summary line on stdout; exits 1 (with the error on stderr) on failure.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, token, screenshot] = process.argv.slice(2);
if (!url || !token || !screenshot) {
  console.error("usage: node auditor_page.mjs <page url> <auditor token> <screenshot path>");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const TIMEOUT = 20000;

const userDataDir = mkdtempSync(join(tmpdir(), "sov-auditor-chromium-"));
let context;
const summary = { console_errors: [], page_errors: [], requests_outside: [] };
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1400, height: 900 },
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);
  const origin = new URL(url).origin;
  page.on("console", (m) => { if (m.type() === "error") summary.console_errors.push(m.text()); });
  page.on("pageerror", (e) => summary.page_errors.push(String(e)));
  page.on("request", (r) => { if (!r.url().startsWith(origin)) summary.requests_outside.push(r.url()); });

  const resp = await page.goto(url, { waitUntil: "load" });
  summary.page_status = resp ? resp.status() : null;
  summary.title = await page.title();

  // Without a token the page asks for one and shows no records.
  summary.rows_before_token = await page.locator("#results tbody tr").count();

  // Token -> verification banner and the unfiltered table.
  await page.fill("#token", token);
  await page.click("#token-save");
  await page.waitForSelector('#verify-status[data-state="intact"], #verify-status[data-state="broken"], #verify-status[data-state="error"]');
  summary.verify_state = await page.getAttribute("#verify-status", "data-state");
  summary.verify_text = (await page.textContent("#verify-status")).trim();
  await page.waitForSelector('#results[data-loaded="true"]');
  summary.token_in_session_storage = await page.evaluate(() => !!sessionStorage.getItem("sov-auditor-token"));
  summary.rows_all = await page.locator("#results tbody tr").count();

  // Filter: decision = deny.
  await page.selectOption('#filters select[name="decision"]', "deny");
  await Promise.all([
    page.waitForResponse((r) => r.url().includes("/admin/audit/records?") && r.url().includes("decision=deny")),
    page.click("#apply"),
  ]);
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll("#results tbody tr")];
    return rows.length > 0 && rows.every((r) => r.dataset.decision === "deny");
  });
  const rows = page.locator("#results tbody tr");
  summary.rows_deny = await rows.count();
  summary.row_decisions = await rows.evaluateAll((rs) => [...new Set(rs.map((r) => r.dataset.decision))]);

  // Detail of the first row.
  const seq = await rows.first().getAttribute("data-seq");
  await rows.first().click();
  await page.waitForSelector("#detail:not([hidden])");
  await page.waitForFunction((s) => document.getElementById("detail-seq").textContent === s, seq);
  summary.detail_seq = Number(seq);
  summary.detail_fields = await page.locator("#detail-fields dt").allTextContents();
  summary.detail_text = await page.textContent("#detail-fields");
  summary.detail_canonical = await page.textContent("#detail-canonical");

  // Inclusion proof -> verified badge.
  await page.click("#proof-button");
  await page.waitForSelector('#proof-status[data-verified]');
  summary.proof_verified = await page.getAttribute("#proof-status", "data-verified");
  summary.proof_badge = (await page.textContent("#proof-status")).trim();
  summary.proof_json = JSON.parse(await page.textContent("#proof"));

  summary.message = await page.textContent("#message");
  await page.screenshot({ path: screenshot, fullPage: true });
  summary.screenshot = screenshot;
  summary.ok = true;
  console.log(JSON.stringify(summary));
} catch (e) {
  summary.ok = false;
  summary.error = String(e && e.stack ? e.stack : e);
  console.log(JSON.stringify(summary));
  console.error(summary.error);
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
