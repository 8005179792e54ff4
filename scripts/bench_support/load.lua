-- wrk script of scripts/bench: 1-recipient, 1-part sends rotating over the API users.
-- The driver prepends `USERS = {...}`, `SENDER = "..."` (the users it created),
-- `RECIPIENTS = N` (how many distinct numbers the sends go to) and `THREADS = N` (wrk's), and
-- passes where in the rotation to start (`wrk ... URL START`): the previous run's `next`.
-- Requests are built once per thread (init) and replayed in turn: building them per request
-- would cost wrk more CPU than the server under test on a small machine.
-- Every response is checked: a status other than 200, or a body not starting with "OK",
-- is counted; `done` prints one `BENCH_RESULT {json}` line for the driver.

local threads = {}
local requests = {}
-- This thread's place in the rotation, counted from the first run of wrk (a global, so that
-- `done` can read every thread's).
position = 0

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

-- The k-th recipient: +3361 and seven digits, valid French mobile numbers, skipping the
-- simulated operator's `...99NNN` test numbers (their last five digits start with 99).
local function recipients(count)
   local numbers, j = {}, 0
   while #numbers < count do
      local digits = string.format("%07d", j)
      if string.sub(digits, 3, 4) ~= "99" then
         numbers[#numbers + 1] = "+3361" .. digits
      end
      j = j + 1
   end
   return numbers
end

function init(args)
   local numbers = recipients(RECIPIENTS)
   -- wrk.format and escape cost microseconds a call: 100,000 requests built with them took
   -- wrk most of a second inside the measured window. The user part of the URL and the
   -- request's head are built once; per request only digits are added (the + as %2B).
   local prefixes = {}
   for u, user in ipairs(USERS) do
      prefixes[u] = "/cgi-bin/sms/http2sms.cgi?account=" .. escape(user.account)
         .. "&login=" .. escape(user.login) .. "&password=" .. escape(user.password)
         .. "&from=" .. escape(SENDER) .. "&to="
   end
   local head, tail = string.match(wrk.format("GET", "/PATH"), "^(.-)/PATH(.*)$")
   local message = "&message=" .. escape("Your code is ")
   -- One request per recipient, repeated up to at least 1,024 requests. The threads take
   -- turns along the rotation (thread k the places start + k, start + k + THREADS, ...) from
   -- where the previous run of wrk stopped, so no number is sent to twice until all have
   -- been (a warm-up would otherwise fill the gateway's number cache for the run).
   for i = 0, RECIPIENTS * math.ceil(1024 / RECIPIENTS) - 1 do
      local to = numbers[(i % RECIPIENTS) + 1]
      local code = string.format("%06d", (i * 7919) % 1000000)
      requests[i + 1] = head .. prefixes[(i % #USERS) + 1] .. "%2B" .. string.sub(to, 2)
         .. message .. code .. "&noStop=1" .. tail
   end
   position = (tonumber(args[1]) or 0) + thread_no - THREADS
end

function request()
   position = position + THREADS
   return requests[(position % #requests) + 1]
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
   local status, body, sample, next = 0, 0, nil, 0
   for _, thread in ipairs(threads) do
      status = status + (thread:get("bad_status") or 0)
      body = body + (thread:get("bad_body") or 0)
      sample = sample or thread:get("first_bad")
      -- Past every place a thread took, sent or not (wrk also builds one request it never
      -- sends, to check the script).
      next = math.max(next, (thread:get("position") or 0) + 1)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, '
      .. '"write": %d, "status": %d, "timeout": %d, "bad_status": %d, "bad_body": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, '
      .. '"next": %d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      status, body, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean, next))
   if sample ~= nil then
      io.write("BENCH_SAMPLE ", string.format("%q", string.sub(sample, 1, 300)), "\n")
   end
end
