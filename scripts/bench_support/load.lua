-- wrk script of scripts/bench: 1-recipient, 1-part sends rotating over the API users.
-- The driver prepends `USERS = {...}`, `SENDER = "..."` (the users it created),
-- `RECIPIENTS = N` (how many distinct numbers the sends go to) and `THREADS = N` (wrk's), and
-- passes where in the rotation to start (`wrk ... URL START`): the previous run's `next`
-- (its BENCH_RESULT field). For the Kannel peer row it also prepends `KANNEL = true`: the same
-- sends through Kannel's `/cgi-bin/sendsms`, accepted as `202` with `0: Accepted...`.
-- Every response is checked: a status other than the accepted one, or a body not starting
-- with the accepted prefix, is counted; `done` prints one `BENCH_RESULT {json}` line for the
-- driver.

local threads = {}
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

-- The k-th recipient's seven digits after +3361: valid French mobile numbers, skipping the
-- simulated operator's `...99NNN` test numbers (their last five digits start with 99, the
-- last 1,000 of every 100,000).
local function recipient(k)
   return string.format("%07d", math.floor(k / 99000) * 100000 + k % 99000)
end

-- The parts of a request that do not change, built once (escape and wrk.format cost
-- microseconds a call).
local head, tail, prefixes, message, suffix
local accept_status, accept_prefix = 200, "OK"

function init(args)
   prefixes = {}
   for u, user in ipairs(USERS) do
      if KANNEL then
         prefixes[u] = "/cgi-bin/sendsms?username=" .. escape(user.login)
            .. "&password=" .. escape(user.password)
            .. "&from=" .. escape(SENDER) .. "&to=%2B3361"
      else
         prefixes[u] = "/cgi-bin/sms/http2sms.cgi?account=" .. escape(user.account)
            .. "&login=" .. escape(user.login) .. "&password=" .. escape(user.password)
            .. "&from=" .. escape(SENDER) .. "&to=%2B3361"
      end
   end
   head, tail = string.match(wrk.format("GET", "/PATH"), "^(.-)/PATH(.*)$")
   if KANNEL then
      message, suffix = "&text=" .. escape("Your code is "), ""
      accept_status, accept_prefix = 202, "0: Accepted"
   else
      message, suffix = "&message=" .. escape("Your code is "), "&noStop=1"
   end
   -- The threads take turns along the rotation (thread k the places start + k,
   -- start + k + THREADS, ...) from where the previous run of wrk stopped, so no number is
   -- sent to twice until all have been (a warm-up would otherwise fill the gateway's number
   -- cache for the run).
   position = (tonumber(args[1]) or 0) + thread_no - THREADS
end

-- Each request is built when it is sent: wrk's CPU a request stays what it was when it
-- replayed prebuilt ones (34-35 µs in all). Building 100,000 of them up front cost wrk 0.2 s
-- of CPU at the start of every run, and the scheduler then made wrk wait behind the busy
-- gateway for a few hundred milliseconds: the first answers of each run were read late,
-- which put the p99 of 3 s runs at 80-245 ms instead of about 50.
function request()
   position = position + THREADS
   return head .. prefixes[(position % #USERS) + 1] .. recipient(position % RECIPIENTS)
      .. message .. string.format("%06d", (position * 7919) % 1000000) .. suffix .. tail
end

function response(status, headers, body)
   if status ~= accept_status then
      bad_status = bad_status + 1
      if first_bad == nil then first_bad = "HTTP " .. status .. " " .. (body or "") end
   elseif body == nil or string.sub(body, 1, #accept_prefix) ~= accept_prefix then
      bad_body = bad_body + 1
      if first_bad == nil then first_bad = body or "(no body)" end
   end
end

function done(summary, latency, requests_done)
   local status, body, sample, resume = 0, 0, nil, 0
   for _, thread in ipairs(threads) do
      status = status + (thread:get("bad_status") or 0)
      body = body + (thread:get("bad_body") or 0)
      sample = sample or thread:get("first_bad")
      -- Past every place a thread took, sent or not (wrk also builds one request it never
      -- sends, to check the script).
      resume = math.max(resume, (thread:get("position") or 0) + 1)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, '
      .. '"write": %d, "status": %d, "timeout": %d, "bad_status": %d, "bad_body": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, '
      .. '"next": %d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      status, body, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean, resume))
   if sample ~= nil then
      io.write("BENCH_SAMPLE ", string.format("%q", string.sub(sample, 1, 300)), "\n")
   end
end
