#!/usr/bin/env node
// Enqueue images for imageqa workers from Node.js, with the celery-node package (no imageqa code).
//
//   npm install            # in this folder: celery-node, pinned in package.json
//   node enqueue.js redis://:PASSWORD@HOST:6379/0 my-job /data/a.jpg /data/b.jpg
//
// Each image becomes one task `imageqa.generate` (Celery protocol 2, JSON kwargs; docs/enqueue.md).
// The collector writes the results to <IMAGEQA_OUTPUT_DIR>/<job id>.jsonl and failures to
// <job id>.errors.jsonl, one line per image. Every message declares the job's size (job_total), so
// the job is marked done, and announced on the Redis channel imageqa:job:<job id>:events, once every
// image has its line. Image paths must be the paths the workers see (under
// their IMAGEQA_MEDIA_ROOTS, /data in the compose deployment); http(s):// and data: references are
// sent unchanged.
"use strict";

const crypto = require("node:crypto");
const path = require("node:path");
const celery = require("celery-node");

const TASK = "imageqa.generate";
const QUEUE = "imageqa.generate";

function taskKwargs(jobId, index, image, total) {
  const ref = /^[a-zA-Z][a-zA-Z0-9+.-]*:/.test(image) ? image : path.resolve(image);
  // Stable across resends of the same input, so a resent image is written once, not twice.
  const itemId = crypto.createHash("sha256").update(`${index}\n${ref}`).digest("hex").slice(0, 32);
  return {
    schema_version: 1,
    job_id: jobId,
    item_id: itemId,
    row_index: index,
    images: [ref],
    row: { image: [ref] },
    enqueued_at: Date.now() / 1000, // optional: lets the workers measure queue wait
    job_total: total, // optional: the job is marked done once this many rows are written
  };
}

async function main(argv) {
  const [redisUrl, jobId, ...images] = argv;
  if (!redisUrl || !jobId || images.length === 0) {
    console.error("usage: node enqueue.js REDIS_URL JOB_ID IMAGE...");
    return 2;
  }
  // celery-node waits for a result backend too; imageqa tasks store no result, so give it the same
  // Redis, which is never written.
  const client = celery.createClient(redisUrl, redisUrl, QUEUE);
  try {
    await client.isReady();
    for (const [index, image] of images.entries()) {
      const kwargs = taskKwargs(jobId, index, image, images.length);
      // Build the protocol 2 message and publish it ourselves: client.sendTask() publishes in the
      // background and returns no promise for it, so a disconnect right after could lose messages.
      const message = client.asTaskV2(`${jobId}:${kwargs.item_id}`, TASK, [], kwargs);
      await client.broker.publish(message.body, "", QUEUE, message.headers, message.properties);
    }
  } finally {
    await client.disconnect();
  }
  console.log(jobId);
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(error);
    process.exit(1);
  },
);
