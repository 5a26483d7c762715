-- GET a list of paths in turn (e.g. every page of /aggregates?limit=1000,
-- with the cursors the harness collected once beforehand).
--   wrk -s pages.lua URL -- PATHS_FILE

dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

local paths = {}
local next_index = 1

function init(args)
   for line in io.lines(args[1]) do
      if line ~= "" then
         table.insert(paths, line)
      end
   end
   next_index = ((tid or 1) * 7) % #paths + 1
end

function request()
   local path = paths[next_index]
   next_index = next_index % #paths + 1
   return wrk.format("GET", path)
end
