// graphile-worker beside Kiln's work pools, for bench/dispatch: the same no-op jobs on the
// same PostgreSQL, measured the same way.
//
//   node bench.mjs worker CONCURRENCY     # prints "start <ms>" per job: add-to-start latency
//   node bench.mjs submit N               # adds N jobs at once, waits until all are done
//   node bench.mjs lone N                 # adds N jobs one after the other (each done first)
//
// DATABASE_URL names the database. Times come from the monotonic clock (CLOCK_MONOTONIC,
// the same in every process of the machine), in milliseconds.
import { Logger, makeWorkerUtils, run } from "graphile-worker";

const [mode, arg] = process.argv.slice(2);
const connectionString = process.env.DATABASE_URL;
// Only warnings and errors: a line per job would cost more than the job.
const quiet = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(message);
});
const now = () => Number(process.hrtime.bigint()) / 1e6;

async function pending(utils) {
  return utils.withPgClient(async (client) => {
    const { rows } = await client.query("SELECT count(*)::int AS n FROM graphile_worker.jobs");
    return rows[0].n;
  });
}

if (mode === "worker") {
  const concurrency = Number(arg || 64);
  const runner = await run({
    connectionString,
    concurrency,
    maxPoolSize: concurrency + 2,
    noHandleSignals: false,
    pollInterval: 2000,
    preset: { worker: { localQueue: { size: concurrency + 1 } } },
    logger: quiet,
    taskList: {
      noop: async (payload) => {
        process.stdout.write(`start ${now() - payload.added}\n`);
      },
    },
  });
  await runner.promise;
} else if (mode === "submit" || mode === "lone") {
  const n = Number(arg || 1000);
  const utils = await makeWorkerUtils({ connectionString, logger: quiet });
  await utils.migrate();
  const started = now();
  if (mode === "submit") {
    const specs = [];
    for (let i = 0; i < n; i++) specs.push({ identifier: "noop", payload: { i, added: now() } });
    await utils.addJobs(specs);
  } else {
    for (let i = 0; i < n; i++) {
      await utils.addJob("noop", { i, added: now() });
      while ((await pending(utils)) > 0) await new Promise((r) => setTimeout(r, 1));
    }
  }
  while ((await pending(utils)) > 0) await new Promise((r) => setTimeout(r, 2));
  const seconds = (now() - started) / 1000;
  console.log(JSON.stringify({ mode, n, seconds, runs_per_second: n / seconds }));
  await utils.release();
} else if (mode === "migrate") {
  const utils = await makeWorkerUtils({ connectionString });
  await utils.migrate();
  await utils.release();
} else {
  console.error("usage: bench.mjs worker C | submit N | lone N | migrate");
  process.exit(2);
}
