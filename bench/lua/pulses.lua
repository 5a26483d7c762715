-- POST /pulses with a fresh body per request.
--   wrk -s pulses.lua URL -- SHAPE COUNT IDS PREFIX TENANTS
-- SHAPE: single | array | ndjson; COUNT: pulses per request (1 for single);
-- IDS: 1 to give every pulse an id, 0 for none, random for an id of 32
-- random hex digits, as a client making UUIDs sends; PREFIX: random per run,
-- so ids (PREFIX-thread-counter) are unique across the whole bench run and
-- the dedup index does real work; TENANTS: how many tenants to spread over.
-- Ids of one client share a prefix, as `ingestor.client` makes them, and
-- land in one stretch of the store's index; random ones land all over it.

dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
counts_accepted = true

local shape, count, ids, prefix, tenants = "single", 1, "1", "run", 100
local counter = 0
local skus = { "sku-compute", "sku-storage", "sku-egress", "sku-api", "sku-search",
               "sku-ml", "sku-db", "sku-cdn", "sku-mail", "sku-queue" }
local units = { "api_call", "gb_hour" }
local amounts = { "1", "2.5", "0.000000001", "100", "17.25", "3" }
local random = math.random

function init(args)
   shape = args[1] or shape
   count = tonumber(args[2] or count)
   ids = args[3] or ids
   prefix = args[4] or prefix
   tenants = tonumber(args[5] or tenants)
   math.randomseed(os.time() * 1000 + (tid or 0))
   wrk.method = "POST"
   wrk.path = "/pulses"
   if shape == "ndjson" then
      wrk.headers["Content-Type"] = "application/x-ndjson"
   else
      wrk.headers["Content-Type"] = "application/json"
   end
end

local function pulse()
   local head = '{"tenant_id":"t' .. random(tenants) .. '","product_sku":"'
      .. skus[random(#skus)] .. '","use_unit":"' .. units[random(#units)]
      .. '","used_amount":"' .. amounts[random(#amounts)] .. '"'
   if ids == "1" then
      counter = counter + 1
      return head .. ',"id":"' .. prefix .. '-' .. tid .. '-' .. counter .. '"}'
   elseif ids == "random" then
      local digits = {}
      for i = 1, 8 do
         digits[i] = string.format("%04x", random(0, 0xffff))
      end
      return head .. ',"id":"' .. table.concat(digits) .. '"}'
   end
   return head .. '}'
end

function request()
   local body
   if shape == "single" then
      body = pulse()
   else
      local parts = {}
      for i = 1, count do
         parts[i] = pulse()
      end
      if shape == "ndjson" then
         body = table.concat(parts, "\n") .. "\n"
      else
         body = "[" .. table.concat(parts, ",") .. "]"
      end
   end
   return wrk.format(nil, nil, nil, body)
end
