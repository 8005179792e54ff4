-- wrk script of scripts/bench: 1-recipient, 1-part sends rotating over the API users.
-- The driver prepends `USERS = {...}` and `SENDER = "..."` (the users it created).
-- Requests are built once per thread (init) and replayed in turn: building them per request
-- would cost wrk more CPU than the server under test on a small machine.
-- Every response is checked: a status other than 200, or a body not starting with "OK",
-- is counted; `done` prints one `BENCH_RESULT {json}` line for the driver.

local threads = {}
local requests = {}
local index = 0

bad_status = 0
bad_body = 0
first_bad = nil

function setup(thread)
   thread:set("thread_no", #threads)
   table.insert(threads, thread)
end

local function escape(text)
   return (string.gsub(text, "[^%w%-%._~]", function(c)
      return string.format("%%%02X", string.byte(c))
   end))
end

function init(args)
   local n = 0
   for i = 0, 1023 do
      local user = USERS[(i % #USERS) + 1]
      -- +336123456NN: valid French mobile numbers, none of them a `...99NNN` test number.
      local to = string.format("+336123456%02d", (i * 7 + thread_no * 13) % 99)
      local code = string.format("%06d", (i * 7919 + thread_no * 104729) % 1000000)
      local path = "/cgi-bin/sms/http2sms.cgi?account=" .. escape(user.account)
         .. "&login=" .. escape(user.login) .. "&password=" .. escape(user.password)
         .. "&from=" .. escape(SENDER) .. "&to=" .. escape(to)
         .. "&message=" .. escape("Your code is " .. code) .. "&noStop=1"
      n = n + 1
      requests[n] = wrk.format("GET", path)
   end
   index = thread_no * 97
end

function request()
   index = (index % #requests) + 1
   return requests[index]
end

function response(status, headers, body)
   if status ~= 200 then
      bad_status = bad_status + 1
      if first_bad == nil then first_bad = "HTTP " .. status .. " " .. (body or "") end
   elseif body == nil or string.sub(body, 1, 2) ~= "OK" then
      bad_body = bad_body + 1
      if first_bad == nil then first_bad = body or "(no body)" end
   end
end

function done(summary, latency, requests_done)
   local status, body, sample = 0, 0, nil
   for _, thread in ipairs(threads) do
      status = status + (thread:get("bad_status") or 0)
      body = body + (thread:get("bad_body") or 0)
      sample = sample or thread:get("first_bad")
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, '
      .. '"write": %d, "status": %d, "timeout": %d, "bad_status": %d, "bad_body": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      status, body, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
   if sample ~= nil then
      io.write("BENCH_SAMPLE ", string.format("%q", string.sub(sample, 1, 300)), "\n")
   end
end
