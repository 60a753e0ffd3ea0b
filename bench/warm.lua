-- wrk script for berth's warm-turn benchmark.
-- Usage: wrk -t N -c N -s warm.lua URL -- <session-prefix> <api-key>
-- Run with as many threads as connections: each wrk thread then owns exactly
-- one connection and one session id ("<prefix>-<thread no, 28 digits>"), so
-- no two in-flight requests ever share a session (berth serializes turns per
-- session by design; sharing would measure its queue, not its routing).
-- The Authorization header is sent to every target (ignored by the direct
-- agent and HAProxy), so the request bytes differ only in the path.
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

function init(args)
  local prefix = args[1] or "bench-warm"
  local key = args[2] or "none"
  local sid = string.format("%s-%028d", prefix, tid)
  req = wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. key,
    ["X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"] = sid,
  }, '{"prompt":"hello agent"}')
end

function request()
  return req
end

-- machine-readable summary (latency values are in microseconds)
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_mean_us":%.2f,"lat_max_us":%d,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
