// Drives Debian's Chromium (headless) through the dashboard, as an operator would. Run by
// tests/e2e/browser.rs, which starts the worker, seeds dead letters and checks afterwards what
// ran. Exits non-zero with the reason on the first thing that is not as expected.
//
//   node dashboard.mjs full       DASH_URL, FAIL_FILE, SCREENSHOT
//   node dashboard.mjs read-only  DASH_URL
//   node dashboard.mjs shot       DASH_URL, SCREENSHOT (the README's picture of the overview)
import { chromium } from 'playwright-core';
import fs from 'node:fs';

const base = process.env.DASH_URL;
const mode = process.argv[2];
const T = 20_000; // ms: the longest wait for anything

function check(cond, what) {
  if (!cond) throw new Error(`not as expected: ${what}`);
}

async function text(page, selector) {
  return (await page.locator(selector).first().textContent({ timeout: T })).trim();
}

/** Waits until `selector`'s text is `want`, reading it as the page updates itself. */
async function untilText(page, selector, want, what) {
  try {
    await page.waitForFunction(
      ([s, w]) => document.querySelector(s)?.textContent.trim() === w,
      [selector, want],
      { timeout: T, polling: 100 },
    );
  } catch {
    const got = await page.locator(selector).first().textContent().catch(() => '(absent)');
    throw new Error(`${what}: ${selector} shows ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  // Playwright gives every launch a fresh temporary profile (--user-data-dir).
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const problems = [];
const steps = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 640 } });
  // A script error or a Content-Security-Policy violation shows up here.
  page.on('pageerror', (e) => problems.push(`page error: ${e}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });

  if (mode === 'full') await full(page);
  else if (mode === 'read-only') await readOnly(page);
  else if (mode === 'shot') {
    await page.goto(`${base}/ui`);
    await page.locator('#queues').waitFor({ timeout: T });
    await page.setViewportSize({ width: 1280, height: 430 });
    await page.screenshot({ path: process.env.SCREENSHOT });
    steps.push('screenshot');
  }
  else throw new Error(`unknown mode ${mode}`);

  check(problems.length === 0, `no script errors or CSP violations, got: ${problems.join(' | ')}`);
  console.log(JSON.stringify({ ok: true, mode, steps }));
} catch (e) {
  console.error(`FAILED (${mode}) after steps [${steps.join(', ')}]: ${e.message}`);
  if (problems.length) console.error(`browser problems: ${problems.join(' | ')}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}

async function full(page) {
  // Overview: the queue, its levels, three dead letters.
  await page.goto(`${base}/ui`);
  await page.locator('tr.queue[data-queue="default"]').waitFor({ timeout: T });
  check(await page.locator('tr.level[data-queue="default"]').count() >= 1, 'a row per priority level');
  await untilText(page, 'tr.queue[data-queue="default"] td[data-col="dead"]', '3', 'overview dead count');
  steps.push('overview');

  // The queue page's counters before any job ran.
  await page.click('tr.queue[data-queue="default"] a');
  await page.locator('#counters').waitFor({ timeout: T });
  const before = Number(await text(page, '#counters td[data-col="processed"]'));
  steps.push(`queue page (processed ${before})`);

  // Enqueue five jobs with the form (navigation by the nav bar: htmx-boosted, no reload).
  await page.click('header nav a[href="/ui/enqueue"]');
  await page.locator('form#enqueue').waitFor({ timeout: T });
  for (let i = 0; i < 5; i++) {
    await page.selectOption('form#enqueue select[name="job"]', 'work');
    await page.selectOption('form#enqueue select[name="queue"]', 'default');
    await page.fill('form#enqueue textarea[name="payload"]', JSON.stringify({ n: 500 + i, sleep_ms: 400 }));
    await page.evaluate(() => document.querySelector('#flash')?.remove());
    await page.click('form#enqueue button[type="submit"]');
    const said = await text(page, '#flash');
    check(said.startsWith('Enqueued work on default as '), `the form enqueued (${said})`);
  }
  steps.push('enqueued 5 by form');

  // Watch them run on the queue page, which refreshes itself: no reload.
  await page.click('header nav a[href="/ui"]');
  await page.click('tr.queue[data-queue="default"] a');
  await page.locator('#counters').waitFor({ timeout: T });
  await page.evaluate(() => { window.__same_page = true; });
  await untilText(page, '#counters td[data-col="processed"]', String(before + 5), 'jobs run, counted live');
  check(await page.evaluate(() => window.__same_page === true), 'the counts changed without a reload');
  steps.push('counts changed live');

  // Dead letters: filter by job name, then by error text.
  await page.goto(`${base}/ui/queues/default/dead`);
  await page.locator('#count[data-count="3"]').waitFor({ timeout: T });
  await page.selectOption('form.filters select[name="job"]', 'ghost');
  await page.click('form.filters button[type="submit"]');
  await page.locator('#count[data-count="1"]').waitFor({ timeout: T });
  check((await text(page, '#dead td[data-col="job"]')) === 'ghost', 'the job filter keeps ghost only');
  await page.selectOption('form.filters select[name="job"]', '');
  await page.fill('form.filters input[name="error"]', 'FAIL FLAG');
  await page.click('form.filters button[type="submit"]');
  // The count was 1 before too: wait for the new list itself.
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('#dead td[data-col="error"]')];
    return document.querySelector('#count')?.dataset.count === '1' && rows.length === 1
      && rows[0].textContent.includes('the E2E fail flag is set');
  }, null, { timeout: T }).catch(() => { throw new Error('the error filter (any case) keeps the failing job only'); });
  steps.push('filtered');

  // Replay it, now that it can succeed: confirm the dialog, see it leave the list.
  fs.unlinkSync(process.env.FAIL_FILE);
  let asked = '';
  page.once('dialog', (d) => { asked = d.message(); d.accept(); });
  await page.click('#dead button[data-action="replay"]');
  await untilText(page, '#flash', 'Replayed 1 dead letter(s) to default.', 'replay confirmed');
  check(asked.startsWith('Replay dead letter'), `a confirmation was asked (${asked})`);
  await page.locator('#count[data-count="0"]').waitFor({ timeout: T });
  steps.push('replayed one');

  // Inspect one: error, payload, headers.
  await page.goto(`${base}/ui/queues/default/dead?job=ghost`);
  await page.click('#dead td a');
  await page.locator('#details').waitFor({ timeout: T });
  check((await text(page, '#details dd[data-col="error"]')).includes('no handler registered'), 'inspect shows the error');
  check((await text(page, '#payload')).includes('"ghost"'), 'inspect shows the payload');
  steps.push('inspected');

  // This worker: the config, redacted.
  await page.goto(`${base}/ui/worker`);
  check((await text(page, '#config')).includes('[queues.default]'), 'the config is shown');
  steps.push('worker page');

  // The overview once the replay ran: two dead letters left. Its picture goes in the README.
  await page.goto(`${base}/ui`);
  await untilText(page, 'tr.queue[data-queue="default"] td[data-col="dead"]', '2', 'dead count after the replay');
  await page.waitForTimeout(1500); // a few samples for the chart
  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  steps.push('screenshot');
}

async function readOnly(page) {
  await page.goto(`${base}/ui/queues/default/dead`);
  await page.locator('#count').waitFor({ timeout: T });
  check(await page.locator('[data-access="read-only"]').count() === 1, 'a read-only badge');
  check(await page.locator('[data-action]').count() === 0, 'no action buttons');
  check(await page.locator('form[method="post"]').count() === 0, 'no forms that change anything');
  check(await page.locator('header nav a[href="/ui/worker"]').count() === 0, 'no "this worker" in the dashboard command');
  steps.push('no actions');
  await page.goto(`${base}/ui/enqueue`);
  check(await page.locator('form#enqueue').count() === 0, 'no enqueue form');
  check((await page.content()).includes('read-only: it cannot enqueue'), 'says why');
  // Posting anyway (as a script could) is refused.
  const status = await page.evaluate(async () => (await fetch('/ui/queues/default/dead', {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
    body: 'csrf=x&action=purge&scope=filtered',
  })).status);
  check(status === 403, `a post is refused with 403 (got ${status})`);
  // The browser logs that refused post as a failed resource: expected here, and only here.
  await page.waitForTimeout(200);
  const expected = problems.filter((p) => p.includes('status of 403'));
  check(expected.length <= 1, `one refused post logged (${expected.join(' | ')})`);
  problems.splice(0, problems.length, ...problems.filter((p) => !p.includes('status of 403')));
  steps.push('post refused');
}
