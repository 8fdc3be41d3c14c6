// Drives the console page in headless Chromium: signs up through the form, waits for the
// profile and the live change log, prints `watching`, then waits for an event showing
// MESH_EXPECT_NAME (a change another client makes after reading `watching`). Prints `ok` and
// exits 0, or prints the reason and exits 1; any console error, page error or failed request
// is a failure.
//
//   MESH_CONSOLE_URL=http://127.0.0.1:8080/ MESH_EXPECT_NAME='New name' \
//     [MESH_CHROMIUM=/usr/bin/chromium] [MESH_SCREENSHOT=console.png] node test/browser.mjs
//
// stdout carries only `watching` and `ok` (or `FAIL ...`); progress goes to stderr.

import { randomBytes } from "node:crypto";
import puppeteer from "puppeteer-core";

const consoleUrl = process.env.MESH_CONSOLE_URL || "http://127.0.0.1:8080/";
const chromium = process.env.MESH_CHROMIUM || "/usr/bin/chromium";
const expectName = process.env.MESH_EXPECT_NAME;
const screenshot = process.env.MESH_SCREENSHOT;
// How long each step may take (MESH_STEP_MS): a debug build under a loaded machine is slow.
const STEP_MS = Number(process.env.MESH_STEP_MS) || 15000;

const log = (line) => process.stderr.write(`browser: ${line}\n`);

let browser;
let page;
let finished = false;
/** Rejected by the first console error, page error or failed request. */
let fail;
const failure = new Promise((_, reject) => { fail = reject; });
failure.catch(() => {});

async function main() {
  if (!expectName) throw new Error("MESH_EXPECT_NAME is not set (the display name to wait for in #events)");
  const args = ["--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check"];
  if (typeof process.getuid === "function" && process.getuid() === 0) args.push("--no-sandbox");
  browser = await puppeteer.launch({ executablePath: chromium, headless: true, args });
  page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 900 });

  page.on("console", (msg) => {
    if (msg.type() === "error") fail(new Error(`console error: ${msg.text()}`));
  });
  page.on("pageerror", (err) => fail(new Error(`page error: ${err.message ?? err}`)));
  page.on("requestfailed", (req) => {
    if (finished) return;
    fail(new Error(`request failed: ${req.method()} ${req.url()}: ${req.failure()?.errorText ?? "unknown"}`));
  });
  page.on("response", (res) => {
    if (res.status() >= 400) fail(new Error(`HTTP ${res.status()} for ${res.request().method()} ${res.url()}`));
  });

  const step = (what, promise) => Promise.race([
    promise.catch((err) => { throw new Error(`${what}: ${err.message}`); }),
    failure,
  ]);

  log(`opening ${consoleUrl}`);
  const response = await step("loading the page", page.goto(consoleUrl, { waitUntil: "load", timeout: STEP_MS }));
  if (!response || !response.ok()) throw new Error(`the page answered HTTP ${response ? response.status() : "nothing"}`);
  await step("waiting for the sign-up form", page.waitForSelector("#signup-email", { visible: true, timeout: STEP_MS }));

  const rand = randomBytes(6).toString("hex");
  const email = `browser-${rand}@example.com`;
  const name = `Browser ${rand}`;
  await page.type("#signup-email", email);
  await page.type("#signup-password", `pw-${randomBytes(12).toString("hex")}`);
  await page.type("#signup-name", name);
  await page.click("#signup-submit");
  log(`signed up as ${email} (${name})`);

  await step(
    "waiting for #me-name and a live #watch-state",
    page.waitForFunction(
      (want) => {
        const err = document.getElementById("error");
        if (err && !err.hidden && err.textContent) return `error:${err.textContent}`;
        return document.getElementById("me-name")?.textContent === want
          && document.getElementById("watch-state")?.textContent === "live";
      },
      { timeout: STEP_MS, polling: 100 },
      name,
    ).then(async (handle) => {
      const value = await handle.jsonValue();
      if (typeof value === "string") throw new Error(`the page shows an error: ${value.slice(6)}`);
    }),
  );
  const userId = await page.$eval("#me-user-id", (el) => el.textContent);
  log(`profile ${userId} shown, change log live`);
  process.stdout.write("watching\n");

  await step(
    `waiting for an event with ${JSON.stringify(expectName)} in #events`,
    page.waitForFunction(
      (want) => [...document.querySelectorAll("#events li")].some((li) => li.textContent.includes(want)),
      { timeout: STEP_MS, polling: 100 },
      expectName,
    ),
  );
  const line = await page.$$eval("#events li", (lis, want) => lis.find((li) => li.textContent.includes(want))?.textContent, expectName);
  log(`event shown: ${line}`);

  if (screenshot) {
    await step("taking the screenshot", page.screenshot({ path: screenshot, fullPage: true }));
    log(`screenshot ${screenshot}`);
  }
  // Errors reported while the event arrived still count.
  await Promise.race([failure, new Promise((r) => setTimeout(r, 100))]);
  finished = true;
}

try {
  await main();
  await browser?.close().catch(() => {});
  process.stdout.write("ok\n");
  process.exit(0);
} catch (err) {
  finished = true;
  // What the page showed, to tell a slow server from a broken page.
  const shown = await page?.evaluate(() => {
    if (!document.getElementById("watch-state")) return "";
    const text = (id) => document.getElementById(id)?.textContent?.trim() || "";
    return `#me-name ${JSON.stringify(text("me-name"))}, #watch-state ${JSON.stringify(text("watch-state"))}`
      + ` (${text("watch-detail")}), #error ${JSON.stringify(text("error"))}, ${document.querySelectorAll("#events li").length} event(s)`;
  }).catch(() => "");
  if (shown) log(`page: ${shown}`);
  if (screenshot && page) await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
  process.stdout.write(`FAIL ${err.message ?? err}${shown ? ` [${shown}]` : ""}\n`);
  await browser?.close().catch(() => {});
  process.exit(1);
}
