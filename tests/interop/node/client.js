#!/usr/bin/env node
// Node.js interop client of the balpm v1 gRPC API.
//
// Loads proto/balpm/v1/balpm.proto at runtime with @grpc/proto-loader (no generated code),
// runs one small active-learning round against a live server and prints a JSON summary on
// stdout. Exit code 0 only if every step succeeded; on failure the summary has ok=false,
// the failing step and its error, and the exit code is 1.
//
// Steps: CreatePool (client features, D=4) -> UploadItems (client stream, header + chunks,
// one deliberately invalid item) -> IngestLabels (+ an idempotent replay) -> AcquireBatch
// -> ExportLabels (server stream) -> GetPool on a missing pool, decoding the rich error
// from the `grpc-status-details-bin` trailer (google.rpc.Status with ErrorInfo and
// BadRequest) -> DeletePool.
//
// Usage: node client.js --target 127.0.0.1:50051 [--pool ID] [--deadline-ms 30000]
// Env:   BALPM_API_KEY  sent as `authorization: Bearer <key>` when set.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..');
const PROTO_DIR = path.join(REPO_ROOT, 'proto');
const GOOGLEAPIS_DIR = path.join(REPO_ROOT, 'third_party', 'googleapis');
const FEATURE_DIM = 4;
const N_ITEMS = 12;
const OVERALL_TIMEOUT_MS = 120000;

function parseArgs(argv) {
  const args = { target: process.env.BALPM_TARGET || '127.0.0.1:50051', pool: '', deadlineMs: 30000 };
  for (let i = 0; i < argv.length; i += 1) {
    const key = argv[i];
    const value = argv[i + 1];
    if (key === '--target') args.target = value;
    else if (key === '--pool') args.pool = value;
    else if (key === '--deadline-ms') args.deadlineMs = Number(value);
    else throw new Error(`unknown argument ${key}`);
    i += 1;
  }
  if (!args.pool) args.pool = `node-interop-${process.pid}-${Date.now()}`;
  return args;
}

// Loads the service definition straight from the .proto (keepCase keeps snake_case field names).
function loadService() {
  const definition = protoLoader.loadSync(path.join(PROTO_DIR, 'balpm', 'v1', 'balpm.proto'), {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_DIR, GOOGLEAPIS_DIR],
  });
  return grpc.loadPackageDefinition(definition).balpm.v1.BalpmService;
}

// A protobufjs root with google.rpc.Status and the error detail messages.
function loadRpcTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    // google/protobuf/* well-known types are bundled with protobufjs; the rest are vendored.
    if (path.isAbsolute(target)) return target;
    return path.join(GOOGLEAPIS_DIR, target);
  };
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  root.resolveAll();
  return root;
}

// Decodes the `grpc-status-details-bin` trailer of a failed call into a plain object.
function decodeRichStatus(err, rpcRoot) {
  const raw = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw || raw.length === 0) throw new Error('error has no grpc-status-details-bin trailer');
  const Status = rpcRoot.lookupType('google.rpc.Status');
  const status = Status.decode(raw[0]);
  const out = { code: status.code, message: status.message, details: [] };
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = rpcRoot.lookupType(typeName);
    const decoded = type.toObject(type.decode(any.value), { defaults: true });
    out.details.push({ type: typeName, value: decoded });
  }
  return out;
}

function deadline(ms) {
  return new Date(Date.now() + ms);
}

function unary(client, method, request, metadata, ms) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline(ms) }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

function serverStream(client, method, request, metadata, ms) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client[method](request, metadata, { deadline: deadline(ms) });
    call.on('data', (msg) => messages.push(msg));
    call.on('error', reject);
    call.on('end', () => resolve(messages));
  });
}

function uploadItems(client, poolId, chunks, metadata, ms) {
  return new Promise((resolve, reject) => {
    const call = client.UploadItems(metadata, { deadline: deadline(ms) }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
    call.write({ header: { pool_id: poolId } });
    for (const items of chunks) call.write({ chunk: { items } });
    call.end();
  });
}

// Deterministic features: no RNG needed, distinct per item.
function makeItem(i) {
  const vec = (offset) => Array.from({ length: FEATURE_DIM }, (_, d) => Math.sin(i * 1.7 + d * 0.9 + offset));
  return {
    item_id: `node-${i}`,
    prompt: `prompt ${i} (node)`,
    completion_a: `completion a ${i}`,
    completion_b: `completion b ${i}`,
    prompt_features: vec(0),
    completion_a_features: vec(1),
    completion_b_features: vec(2),
  };
}

async function run(args, summary) {
  const Service = loadService();
  const rpcRoot = loadRpcTypes();
  const client = new Service(args.target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (process.env.BALPM_API_KEY) metadata.set('authorization', `Bearer ${process.env.BALPM_API_KEY}`);
  const ms = args.deadlineMs;
  summary.target = args.target;
  summary.pool_id = args.pool;

  try {
    summary.step = 'CreatePool';
    const created = await unary(client, 'CreatePool', {
      pool_id: args.pool,
      settings: {
        feature_source: 'FEATURE_SOURCE_CLIENT',
        feature_dim: FEATURE_DIM,
        ensemble_size: 2,
        hidden_sizes: [8],
        knn_k: 3, // BAL-PM's kNN entropy needs more than knn_k items
        epochs: 5,
      },
    }, metadata, ms);
    summary.create_pool = {
      pool_id: created.pool.pool_id,
      state: created.pool.state,
      feature_source: created.pool.settings.feature_source,
      feature_dim: created.pool.settings.feature_dim,
      ensemble_size: created.pool.settings.ensemble_size,
    };

    summary.step = 'UploadItems';
    const items = Array.from({ length: N_ITEMS }, (_, i) => makeItem(i));
    const bad = { ...makeItem(999), item_id: 'node-bad', prompt_features: [1, 2] }; // wrong dimension
    const upload = await uploadItems(client, args.pool, [items.slice(0, 5), [...items.slice(5), bad]], metadata, ms);
    summary.upload = {
      accepted_count: Number(upload.accepted_count),
      duplicate_count: Number(upload.duplicate_count),
      rejections: upload.rejections.map((r) => ({ id: r.id, field: r.field, reason: r.reason })),
      item_count: Number(upload.pool.item_count),
    };

    summary.step = 'IngestLabels';
    const labels = [
      { label_id: 'node-l0', item_id: 'node-0', preference: 'PREFERENCE_A', annotator_id: 'node-annotator' },
      { label_id: 'node-l1', item_id: 'node-1', preference: 'PREFERENCE_B', annotator_id: 'node-annotator' },
      { label_id: 'node-l2', item_id: 'node-2', preference: 'PREFERENCE_TIE', annotator_id: 'node-annotator' },
    ];
    const ingest = await unary(client, 'IngestLabels', { pool_id: args.pool, labels }, metadata, ms);
    const replay = await unary(client, 'IngestLabels', { pool_id: args.pool, labels }, metadata, ms);
    summary.ingest = {
      stored_count: Number(ingest.stored_count),
      duplicate_count: Number(ingest.duplicate_count),
      label_count: Number(ingest.label_count),
    };
    summary.ingest_replay = {
      stored_count: Number(replay.stored_count),
      duplicate_count: Number(replay.duplicate_count),
      label_count: Number(replay.label_count),
    };

    summary.step = 'AcquireBatch';
    const batch = await unary(client, 'AcquireBatch', {
      pool_id: args.pool,
      batch_size: 4,
      seed: 7,
      lease_ttl_s: 600,
      annotator_id: 'node-annotator',
    }, metadata, ms);
    summary.acquire = {
      item_ids: batch.items.map((it) => it.item.item_id),
      ranks: batch.items.map((it) => it.rank),
      strategy: batch.strategy,
      posterior_version: Number(batch.posterior_version),
      has_lease_expire_time: Boolean(batch.lease_expire_time),
    };

    summary.step = 'ExportLabels';
    const pages = await serverStream(client, 'ExportLabels', { pool_id: args.pool, page_size: 2 }, metadata, ms);
    summary.export = {
      pages: pages.length,
      label_ids: pages.flatMap((p) => p.labels.map((l) => l.label.label_id)),
    };

    summary.step = 'GetPool(missing)';
    let richError = null;
    try {
      await unary(client, 'GetPool', { pool_id: `${args.pool}-missing` }, metadata, ms);
    } catch (err) {
      if (typeof err.code !== 'number') throw err;
      const status = decodeRichStatus(err, rpcRoot);
      const info = status.details.find((d) => d.type === 'google.rpc.ErrorInfo');
      const badRequest = status.details.find((d) => d.type === 'google.rpc.BadRequest');
      richError = {
        grpc_code: err.code,
        grpc_code_name: Object.keys(grpc.status).find((k) => grpc.status[k] === err.code),
        status_code: status.code,
        message: status.message,
        detail_types: status.details.map((d) => d.type),
        reason: info ? info.value.reason : '',
        domain: info ? info.value.domain : '',
        field_violations: badRequest
          ? badRequest.value.field_violations.map((v) => ({ field: v.field, description: v.description }))
          : [],
      };
    }
    if (richError === null) throw new Error('GetPool on a missing pool succeeded');
    summary.missing_pool_error = richError;

    summary.step = 'DeletePool';
    await unary(client, 'DeletePool', { pool_id: args.pool }, metadata, ms);
    summary.deleted = true;
    summary.step = 'done';
  } finally {
    client.close();
  }
}

async function main() {
  const summary = { ok: false, step: 'init' };
  const watchdog = setTimeout(() => {
    summary.error = `timed out after ${OVERALL_TIMEOUT_MS} ms`;
    process.stdout.write(`${JSON.stringify(summary)}\n`);
    process.exit(1);
  }, OVERALL_TIMEOUT_MS);
  try {
    await run(parseArgs(process.argv.slice(2)), summary);
    summary.ok = true;
  } catch (err) {
    summary.error = err && err.message ? err.message : String(err);
    if (err && typeof err.code === 'number') {
      summary.grpc_code = err.code;
      try {
        summary.grpc_status = decodeRichStatus(err, loadRpcTypes());
      } catch (decodeErr) {
        summary.grpc_status = null;
      }
    }
  }
  clearTimeout(watchdog);
  process.stdout.write(`${JSON.stringify(summary)}\n`);
  process.exitCode = summary.ok ? 0 : 1;
}

main();
