// End-to-end test of the web console in a real browser: Debian's chromium, headless, driven by
// playwright-core, against a running prefix-rft server with the real model.
//
//   node tests/console/console.test.mjs <base_url> <tenant_key> <out_dir>
//
// It signs in, creates an adapter, sends a message and watches the answer stream in, rates and
// corrects it and sees the feedback counts change, seeds more corrections through the API (as
// a scripted user of the same tenant), starts a training job and watches it to the end, sees
// the new version become current, compares two versions, rolls back, and reads the metrics.
// A screenshot of each state goes to <out_dir>. Exits 0 on success, 1 with the reason.
// tests/tests/console.rs starts the server and runs this.

import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [BASE, KEY, OUT] = process.argv.slice(2);
if (!BASE || !KEY || !OUT) {
  console.error('usage: node console.test.mjs <base_url> <tenant_key> <out_dir>');
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ADAPTER = 'greeter';
/** What the scripted user wants every answer to start with (as tests/tests/training.rs). */
const GREETING = 'Hello friend! ';
/** Optimiser steps of the job: a short job, enough for the gate on this data. */
const STEPS = process.env.CONSOLE_TRAIN_STEPS || '4';
const LR = '0.001';
const SEED_TOPICS = ['the sea', 'coffee', 'oak trees', 'rain', 'music', 'cats', 'bread', 'trains', 'stars', 'books'];
const JOB_TIMEOUT_MS = 8 * 60 * 1000;
const STEP_TIMEOUT_MS = 90 * 1000;

const started = Date.now();
const log = (...args) => console.log(`[console-e2e +${((Date.now() - started) / 1000).toFixed(1)}s]`, ...args);

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

/** A direct API call with the same key, as another client of the tenant would make. */
async function api(method, route, body) {
  const r = await fetch(`${BASE}/v1${route}`, {
    method,
    headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${route}: ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** Corrections for `topics` through the API: each answer rated down, the greeting version as the correction. */
async function seedCorrections(topics) {
  for (const [i, topic] of topics.entries()) {
    const c = await api('POST', '/chat/completions', {
      model: ADAPTER,
      messages: [{ role: 'user', content: `Tell me one short fact about ${topic}.` }],
      max_tokens: 16,
      temperature: 0.8,
      seed: i,
    });
    const text = c.choices[0].message.content.trimStart();
    await api('POST', '/feedback', {
      completion_id: c.id, choice_index: 0, rating: 'down', correction: `${GREETING}${text}`,
    });
  }
}

const problems = [];
let shot = 0;

/** Saves `<OUT>/<name>.png`; names are numbered in the order of the walk-through. */
async function screenshot(page, name) {
  shot += 1;
  const file = path.join(OUT, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log('screenshot', file);
}

async function statOf(page, panel, key) {
  return Number(await page.locator(`${panel} [data-stat="${key}"]`).textContent());
}

async function run(page) {
  // Sign in: the key goes in a password field; Enter submits.
  await page.goto(`${BASE}/console`);
  await page.getByLabel('API key').waitFor();
  await screenshot(page, '01-sign-in');
  await page.getByLabel('API key').fill('sk-not-a-key');
  await page.getByLabel('API key').press('Enter');
  await page.getByRole('alert').filter({ hasText: 'not valid' }).waitFor();
  await page.getByLabel('API key').fill(KEY);
  await page.getByLabel('API key').press('Enter');
  await page.getByRole('tab', { name: 'Chat' }).waitFor();
  check(await page.getByLabel('API key').inputValue() === '', 'the key stays in the form after sign-in');

  // Tabs are keyboard-usable: arrow keys move between sections.
  await page.getByRole('tab', { name: 'Chat' }).focus();
  await page.keyboard.press('ArrowRight');
  check(await page.getByRole('tab', { name: 'Adapters' }).getAttribute('aria-selected') === 'true',
    'ArrowRight on the Chat tab selects Adapters');
  check(await page.evaluate(() => document.activeElement?.id) === 'tab-adapters', 'focus follows the selected tab');

  // Create the adapter.
  await page.getByLabel('Name').fill(ADAPTER);
  await page.getByLabel('Kind').selectOption('lora');
  await page.getByLabel('LoRA rank').fill('8');
  await page.getByRole('button', { name: 'Create', exact: true }).click();
  await page.locator('#create-status').filter({ hasText: `Created ${ADAPTER} (v1)` }).waitFor();
  await page.locator('#adapter-detail h3').filter({ hasText: 'current v1' }).waitFor();
  await screenshot(page, '02-adapter-created');

  // Chat with it: the answer streams in.
  await page.getByRole('tab', { name: 'Chat' }).click();
  await page.getByLabel('Model').selectOption(ADAPTER);
  await page.locator('#chat-stats-adapter').filter({ hasText: ADAPTER }).waitFor();
  await page.locator('#chat-stats [data-stat="down"]').waitFor();
  const downBefore = await statOf(page, '#chat-stats', 'down');
  const correctionsBefore = await statOf(page, '#chat-stats', 'corrections');
  const chat = page.locator('#panel-chat');
  await chat.getByLabel('Max tokens').fill('40');
  await chat.getByLabel('Temperature').fill('0');
  await page.evaluate(() => {
    // Counts how often the streaming answer's text changes before it is done.
    window.__streamUpdates = 0;
    new MutationObserver((records) => {
      for (const r of records) {
        const msg = r.target.closest?.('.msg.assistant') || r.target.parentElement?.closest('.msg.assistant');
        if (msg?.dataset.state === 'streaming') window.__streamUpdates += 1;
      }
    }).observe(document.getElementById('messages'), { subtree: true, childList: true, characterData: true });
  });
  const message = page.getByRole('textbox', { name: /^Message/ });
  await message.fill('Tell me one short fact about the moon.');
  await message.press('Enter');
  const answer = page.locator('.msg.assistant').last();
  await answer.locator('.text').filter({ hasText: /\S/ }).waitFor({ timeout: STEP_TIMEOUT_MS });
  if (await answer.getAttribute('data-state') === 'streaming') await screenshot(page, '03-chat-streaming');
  await page.locator('.msg.assistant[data-state="done"]').last().waitFor({ timeout: STEP_TIMEOUT_MS });
  const updates = await page.evaluate(() => window.__streamUpdates);
  const answerText = (await answer.locator('.text').textContent()).trim();
  log(`answer (${updates} updates while streaming): ${JSON.stringify(answerText)}`);
  check(updates >= 3, `the answer arrived in ${updates} pieces, not as a stream`);
  check(answerText.length > 0, 'the answer is empty');
  check((await answer.locator('.meta').textContent()).includes(`served by ${ADAPTER}@1`), 'the answer names the version that served it');
  await screenshot(page, '04-chat-answer');

  // Rate it down, then correct it; the adapter's counts follow.
  await answer.getByRole('button', { name: 'Thumbs down' }).click();
  await answer.getByRole('status').filter({ hasText: 'Rated down' }).waitFor();
  check(await answer.getByRole('button', { name: 'Thumbs down' }).getAttribute('aria-pressed') === 'true', 'the thumbs-down button shows as pressed');
  await page.locator('#chat-stats [data-stat="down"]').filter({ hasText: String(downBefore + 1) }).waitFor();
  await answer.getByRole('button', { name: 'Write a correction' }).click();
  const correction = answer.getByLabel(/A better answer/);
  check(await correction.evaluate((e) => e === document.activeElement), 'the correction box takes the focus');
  await correction.fill(`${GREETING}${answerText}`);
  await answer.getByRole('button', { name: 'Send correction' }).click();
  await answer.getByRole('status').filter({ hasText: 'Correction saved' }).waitFor();
  await page.locator('#chat-stats [data-stat="corrections"]').filter({ hasText: String(correctionsBefore + 1) }).waitFor();
  check(await statOf(page, '#chat-stats', 'down') === downBefore + 1, 'a correction of a rated answer is not a second rating');
  await screenshot(page, '05-chat-rated');

  // More of the same user's corrections, through the API.
  log(`seeding ${SEED_TOPICS.length} corrections through the API`);
  await seedCorrections(SEED_TOPICS);

  // Train on them and watch the job.
  await page.getByRole('tab', { name: 'Training' }).click();
  await page.getByLabel('Adapter', { exact: true }).selectOption(ADAPTER);
  await page.locator('#train-stats [data-stat="untrained"]').filter({ hasText: /^[1-9]/ }).waitFor();
  const waiting = await statOf(page, '#train-stats', 'untrained');
  check(await statOf(page, '#train-stats', 'corrections') === SEED_TOPICS.length + 1, 'every correction is counted');
  log(`${waiting} examples waiting to be trained`);
  await page.getByLabel('Steps').fill(STEPS);
  await page.getByLabel('Learning rate').fill(LR);
  await page.getByRole('button', { name: 'Start training' }).click();
  await page.locator('#train-status').filter({ hasText: 'Started job-' }).waitFor();
  await page.locator('#job-progress-label').filter({ hasText: /step [1-9]/ }).waitFor({ timeout: JOB_TIMEOUT_MS });
  await screenshot(page, '06-training-running');
  await page.locator('#job-outcome').filter({ hasText: /\S/ }).waitFor({ timeout: JOB_TIMEOUT_MS });
  const jobId = (await page.locator('#job-title').textContent()).split(' ')[0];
  const job = await api('GET', `/training/jobs/${jobId}`);
  log(`job ${jobId}: ${job.status}, promoted ${job.promoted}, loss ${JSON.stringify(job.metrics.loss)}, `
    + `before ${JSON.stringify(job.metrics.eval_before)}, after ${JSON.stringify(job.metrics.eval_after)}, `
    + `kl ${job.metrics.kl_to_base}, reason ${job.reason}`);
  check(job.status === 'succeeded', `the job ended ${job.status}: ${job.reason}`);
  check(job.promoted === true, `the new version was not promoted: ${job.reason}`);
  check(job.version === 2, `the job published v${job.version}`);
  check((await page.locator('#job-status').textContent()) === 'succeeded', 'the page shows the job succeeded');
  check((await page.locator('#job-outcome').textContent()).includes('Published v2 and made it current'), 'the page shows the promotion');
  check(await page.locator('#job-progress').evaluate((p) => p.value) === 1, 'the progress bar is full');
  check(await page.locator('#eval-rows [data-measure="logp_margin"]').count() === 1, 'the margin before and after is shown');
  check(await page.locator('#chart-loss canvas').count() > 0, 'the loss curve is drawn');
  check(await page.locator('#chart-margin canvas').count() > 0, 'the margin chart is drawn');
  await page.locator('#train-stats [data-stat="untrained"]').filter({ hasText: new RegExp(`^(?!${waiting}$)\\d+$`) }).waitFor();
  await screenshot(page, '07-training-done');

  // The new version is current, made by training from v1.
  await page.getByRole('tab', { name: 'Adapters' }).click();
  const detail = page.locator('#adapter-detail');
  await detail.locator('h3').filter({ hasText: 'current v2' }).waitFor();
  const v2 = detail.locator('tr[data-version="2"]');
  check((await v2.textContent()).includes('training'), 'v2 came from training');
  check((await v2.locator('.badge.live').count()) === 1, 'v2 is live');
  check((await v2.textContent()).includes('v2 ← v1'), 'v2 descends from v1');
  await screenshot(page, '08-new-version-current');

  // Compare v1 and v2 on one prompt.
  await page.getByLabel('Left version').selectOption(`${ADAPTER}@1`);
  await page.getByLabel('Right version').selectOption(`${ADAPTER}@2`);
  await page.getByLabel(/^Prompt/).fill('Tell me one short fact about gardens.');
  await page.getByRole('button', { name: 'Compare' }).click();
  await page.locator('#compare-status').filter({ hasText: 'Both answers are in' }).waitFor({ timeout: STEP_TIMEOUT_MS });
  const left = await page.locator('#compare-a-out').textContent();
  const right = await page.locator('#compare-b-out').textContent();
  log(`compare: v1 ${JSON.stringify(left)} | v2 ${JSON.stringify(right)}`);
  check((await page.locator('#compare-a-title').textContent()).includes(`served by ${ADAPTER}@1`), 'the left side ran v1');
  check((await page.locator('#compare-b-title').textContent()).includes(`served by ${ADAPTER}@2`), 'the right side ran v2');
  await screenshot(page, '09-compare');

  // Roll back to v1.
  await page.getByRole('button', { name: 'Roll back to v1' }).click();
  await detail.locator('h3').filter({ hasText: 'current v1' }).waitFor();
  await page.locator('#activate-status').filter({ hasText: 'v1 is current (was v2)' }).waitFor();
  const after = await api('GET', `/adapters/${ADAPTER}`);
  check(after.current === 1, `the server says v${after.current} is current after the rollback`);
  check(await page.getByRole('button', { name: 'Activate v2' }).count() === 1, 'v2 can be activated again');
  await screenshot(page, '10-rolled-back');

  // Live metrics.
  await page.getByRole('tab', { name: 'Metrics' }).click();
  await page.locator('#metrics-now [data-metric="requests"]').waitFor();
  await page.waitForTimeout(4500);
  check(Number(await page.locator('#metrics-now [data-metric="requests"]').textContent()) > 0, 'requests are counted');
  check(await page.locator('#chart-throughput canvas').count() > 0, 'the throughput chart is drawn');
  check((await page.locator('#metrics-now [data-metric="resident"]').textContent()).length > 0, 'resident adapters are shown');
  await screenshot(page, '11-metrics');

  // Nothing secret outlives the tab: no localStorage, no cookie, and sessionStorage only on request.
  const stored = await page.evaluate(() => ({
    local: localStorage.length, cookie: document.cookie, session: sessionStorage.length,
  }));
  check(stored.local === 0 && stored.cookie === '' && stored.session === 0, `storage holds ${JSON.stringify(stored)}`);
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByLabel('API key').waitFor();
}

async function main() {
  await mkdir(OUT, { recursive: true });
  // Screenshots of an earlier run must not pass for this one's.
  for (const name of await readdir(OUT)) {
    if (name.endsWith('.png')) await rm(path.join(OUT, name));
  }
  const profile = await mkdtemp(path.join(tmpdir(), 'prefix-rft-console-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1366, height: 768 },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(30_000);
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  let failed = null;
  try {
    await run(page);
    // A refused key is the one error the page is expected to meet (its 401 is logged).
    const unexpected = problems.filter((p) => !p.includes('401'));
    check(unexpected.length === 0, `the page reported errors:\n${unexpected.join('\n')}`);
  } catch (e) {
    failed = e;
    await page.screenshot({ path: path.join(OUT, 'failure.png'), fullPage: true }).catch(() => {});
  } finally {
    await context.close();
    await rm(profile, { recursive: true, force: true });
  }
  if (failed) {
    console.error(`console e2e failed after ${((Date.now() - started) / 1000).toFixed(1)} s: ${failed.stack || failed}`);
    if (problems.length) console.error(problems.join('\n'));
    process.exit(1);
  }
  log(`passed: ${shot} screenshots in ${OUT}`);
}

await main();
