// Drives headless Chromium for pgrelay's browser tests (tests/integration/browser.rs).
//
// Reads one JSON command per line on stdin and answers each with one JSON line on stdout:
//   {"goto": url}                      open the page (a fresh one each time)
//   {"eval": "js expression"}          its value in the page (awaited; must be JSON-able)
//   {"wait": "js expression", "ms": n} polls until the expression is truthy, then its value
//   {"screenshot": path}               saves the page as PNG
//   {"hover": "css selector"} / {"unhover": true}
// Answers: {"ok": value} or {"error": "message"}. The page's console errors and uncaught
// exceptions are written to stderr. Chromium comes from $CHROMIUM (default /usr/bin/chromium).
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
let page = null;

async function run(command) {
  if (command.goto !== undefined) {
    if (page) await page.close();
    page = await context.newPage();
    page.on("console", (m) => {
      if (m.type() === "error" || m.type() === "warning") console.error(`[page ${m.type()}] ${m.text()}`);
    });
    page.on("pageerror", (e) => console.error(`[page exception] ${e.message}`));
    await page.goto(command.goto);
    return null;
  }
  if (command.eval !== undefined) return await page.evaluate(command.eval);
  if (command.wait !== undefined) {
    // Polled from here with page.evaluate (DevTools' Runtime.evaluate): waitForFunction would
    // eval inside the page, which the dashboard's Content-Security-Policy rightly forbids.
    const deadline = Date.now() + (command.ms ?? 10000);
    for (;;) {
      const value = await page.evaluate(command.wait);
      if (value) return value;
      if (Date.now() > deadline) throw new Error(`timed out after ${command.ms ?? 10000} ms waiting for ${command.wait}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  if (command.screenshot !== undefined) {
    await page.screenshot({ path: command.screenshot, fullPage: true });
    return null;
  }
  if (command.hover !== undefined) {
    await page.hover(command.hover);
    return null;
  }
  if (command.unhover !== undefined) {
    await page.mouse.move(0, 0);
    return null;
  }
  throw new Error(`unknown command ${JSON.stringify(command)}`);
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  let answer;
  try {
    answer = { ok: (await run(JSON.parse(line))) ?? null };
  } catch (err) {
    answer = { error: String(err?.message ?? err) };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
await browser.close();
