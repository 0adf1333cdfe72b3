--[[
examples/recipes/ratelimit.lua: a rate limit per client with regfacade.shared.

Options: per_minute (default 600): requests per client and minute window;
the client is its user name when it sent one, else its address. Over the
limit: 429 TOOMANYREQUESTS with Retry-After: the seconds until the window
ends. The counter lives in
regfacade.shared (one dictionary for every thread and Lua state, kept
across policy reloads); the ping is not counted.
Tested by ratelimit_spec.lua beside it; ratelimit.json runs it.
]]
local regfacade = require "regfacade"
local mirror = require "regfacade.mirror"

return {
    authorize = function(req)
        if req.kind == "ping" or req.repository == nil then -- the ping, and the catalog as a whole
            return true
        end
        local limit = regfacade.config.options.per_minute or 600
        local who = req.client.user or req.client.ip or "?"
        local now = os.time()
        local window = now // 60
        -- incr with init 0 creates the counter at 1 with a TTL of a minute:
        -- atomic across threads, gone when the window is over.
        local n = regfacade.shared.incr("rate:" .. who .. ":" .. window, 1, 0, 60)
        if n > limit then
            return regfacade.deny(429, "TOOMANYREQUESTS",
                string.format("more than %d requests this minute; slow down", limit),
                { retry_after = 60 - now % 60 })
        end
        return true
    end,

    resolve = function(req)
        return mirror.resolve(req)
    end,
}
