-- Shared by every bench script: count answers by status in each thread, and
-- print one machine-readable line at the end for bench/harness.py to parse.
-- Loaded with dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua").
-- A script whose 2xx answers say `"accepted":N` (POST /pulses, of the
-- ingestor and the baseline) sets `counts_accepted = true`: the pulses the
-- server took are then summed from its answers, not assumed from the 2xx.

threads = {}
statuses = {}
first_error = nil
accepted = 0
local thread_count = 0

function setup(thread)
   thread_count = thread_count + 1
   thread:set("tid", thread_count)
   table.insert(threads, thread)
end

function response(status, headers, body)
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
   if status >= 300 and first_error == nil then
      first_error = key .. " " .. string.sub(body or "", 1, 300)
   end
   if counts_accepted and status < 300 then
      accepted = accepted + (tonumber(string.match(body or "", '"accepted":%s*(%d+)')) or 0)
   end
end

local function quote(text)
   text = string.gsub(text, '[%c"\\]', function(c)
      return string.format("\\u%04x", string.byte(c))
   end)
   return '"' .. text .. '"'
end

function done(summary, latency, requests)
   local merged = {}
   local err = nil
   local took = 0
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses") or {}) do
         merged[status] = (merged[status] or 0) + count
      end
      err = err or thread:get("first_error")
      took = took + (thread:get("accepted") or 0)
   end
   local parts = {}
   for status, count in pairs(merged) do
      table.insert(parts, quote(status) .. ":" .. count)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d},' ..
      '"statuses":{%s},"first_error":%s%s}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9),
      table.concat(parts, ","), err and quote(err) or "null",
      counts_accepted and string.format(',"accepted":%d', took) or ""))
end
