// A real NestJS peer for kafka-rpc's interop tests and benchmark (tests/support/nestjs.rs
// drives it). Plain JavaScript (ES modules), so there is nothing to compile: the
// decorators are applied with Reflect.decorate, which is what TypeScript emits for them.
//
//   node peer.mjs server   a NestJS microservice (ServerKafka) with @MessagePattern and
//                          @EventPattern handlers on the topics named in the environment
//   node peer.mjs client   a ClientKafka driven by commands on stdin, one per line
//
// Environment: KAFKA_BROKER (host:port), PREFIX (topic prefix, so runs do not meet),
// GROUP (consumer group base name). Every process prints READY once it can take work,
// and one line per answer, so the test waits on output rather than sleeping.
import 'reflect-metadata';
import { Controller, Module } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { ClientKafka, EventPattern, MessagePattern, RpcException, Transport } from '@nestjs/microservices';
import { createInterface } from 'node:readline';
import { lastValueFrom, timeout } from 'rxjs';

const broker = process.env.KAFKA_BROKER ?? '127.0.0.1:9092';
const prefix = process.env.PREFIX ?? 'interop';
const group = process.env.GROUP ?? `${prefix}-nest`;
const partitions = Number(process.env.PARTITIONS ?? '8');
// kafkajs asks brokers to hold a fetch up to 5 s for data; brokers that hold it the
// whole time (tansu does) would add that to every reply. kafka-rpc's tests use the same.
const maxWaitTimeInMs = Number(process.env.FETCH_WAIT_MS ?? '5');

/** Topics (= NestJS patterns) the peer serves. */
export const topics = {
  sum: `${prefix}.nest.sum`,
  fail: `${prefix}.nest.fail`,
  events: `${prefix}.nest.events`,
};

const kafka = (clientId) => ({
  client: { brokers: [broker], clientId, retry: { retries: 10 }, logLevel: 1 },
});

function say(line) {
  process.stdout.write(`${line}\n`);
}

async function server() {
  class Handlers {
    sum(data) {
      return { sum: data.a + data.b };
    }
    fail(data) {
      throw new RpcException(`insufficient stock for ${data.sku}`);
    }
    event(data) {
      say(`EVENT ${JSON.stringify(data)}`);
    }
  }
  const method = (name, decorator) =>
    Object.defineProperty(
      Handlers.prototype,
      name,
      Reflect.decorate([decorator], Handlers.prototype, name, Object.getOwnPropertyDescriptor(Handlers.prototype, name)),
    );
  method('sum', MessagePattern(topics.sum));
  method('fail', MessagePattern(topics.fail));
  method('event', EventPattern(topics.events));
  const controller = Reflect.decorate([Controller()], Handlers);
  const module = Reflect.decorate([Module({ controllers: [controller] })], class PeerModule {});

  const app = await NestFactory.createMicroservice(module, {
    transport: Transport.KAFKA,
    options: {
      ...kafka('nest-peer'),
      consumer: { groupId: group, maxWaitTimeInMs },
      // Topics are made for each test run; what was sent before we joined is ours.
      subscribe: { fromBeginning: true },
      // One message at a time is kafkajs' default; consuming every partition at once
      // is what a service under load is configured with, and what kafka-rpc does.
      run: { partitionsConsumedConcurrently: partitions },
    },
    logger: ['error', 'warn'],
  });
  await app.listen();
  say('READY');
  const stop = async () => {
    await app.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  // The test holds our stdin; when it closes (the test ended, or died), so do we.
  process.stdin.on('end', stop);
  process.stdin.resume();
}

/** Latency percentiles of `samples` (milliseconds). */
function percentile(sorted, p) {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function client() {
  const patterns = (process.env.PATTERNS ?? '').split(',').filter(Boolean);
  const nest = new ClientKafka({
    ...kafka('nest-peer'),
    consumer: { groupId: group, maxWaitTimeInMs },
    logger: ['error', 'warn'],
  });
  for (const p of patterns) nest.subscribeToResponseOf(p);
  await nest.connect();
  // `send` needs a reply partition, known once the group has assigned one; connect()
  // can return before that.
  const replyTopics = patterns.map((p) => `${p}.reply`);
  while (!replyTopics.every((t) => t in nest.getConsumerAssignments())) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  say('READY');

  const call = (pattern, data) => lastValueFrom(nest.send(pattern, data).pipe(timeout(30_000)));
  const describe = (err) => (typeof err === 'object' ? JSON.stringify(err) : String(err));

  // Runs `total` calls keeping `concurrency` in flight; returns answered, failed and
  // per-call latencies in ms.
  async function load(pattern, total, concurrency, data) {
    const latencies = [];
    let next = 0;
    let failed = 0;
    let firstError = null;
    const started = performance.now();
    async function lane() {
      while (next < total) {
        const i = next++;
        const t0 = performance.now();
        try {
          await call(pattern, data(i));
          latencies.push(performance.now() - t0);
        } catch (err) {
          failed += 1;
          firstError ??= describe(err);
        }
      }
    }
    await Promise.all(Array.from({ length: Math.min(concurrency, total) }, lane));
    const seconds = (performance.now() - started) / 1000;
    latencies.sort((a, b) => a - b);
    return {
      answered: latencies.length,
      failed,
      first_error: firstError,
      seconds,
      per_second: latencies.length / seconds,
      p50_ms: percentile(latencies, 50),
      p99_ms: percentile(latencies, 99),
    };
  }

  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [command, pattern, ...rest] = line.trim().split(' ');
    const arg = rest.join(' ');
    try {
      switch (command) {
        case 'call':
          // `call <pattern> <json>`: one request, answered with REPLY or ERROR.
          try {
            say(`REPLY ${JSON.stringify(await call(pattern, JSON.parse(arg)))}`);
          } catch (err) {
            say(`ERROR ${describe(err)}`);
          }
          break;
        case 'emit':
          // `emit <pattern> <json>`: an event; EMITTED once the broker has it.
          await lastValueFrom(nest.emit(pattern, JSON.parse(arg)));
          say('EMITTED');
          break;
        case 'load': {
          // `load <pattern> <total> <concurrency>`: requests {a: i, b: 1}.
          const [total, concurrency] = rest.map(Number);
          const result = await load(pattern, total, concurrency, (i) => ({ a: i, b: 1 }));
          say(`LOAD ${JSON.stringify(result)}`);
          break;
        }
        default:
          say(`ERROR unknown command ${command}`);
      }
    } catch (err) {
      say(`ERROR ${describe(err)}`);
    }
  }
  await nest.close();
  process.exit(0);
}

const mode = process.argv[2];
const run = mode === 'server' ? server : mode === 'client' ? client : null;
if (!run) {
  console.error('usage: node peer.mjs server|client');
  process.exit(2);
}
run().catch((err) => {
  console.error(err);
  process.exit(1);
});
