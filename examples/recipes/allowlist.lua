--[[
examples/recipes/allowlist.lua: only some repositories may be pulled.

Options: allow = { "library/", "acme/" }: repository name prefixes (as the
client asks for them; "library/" also matches "alpine" on Docker Hub since
the mirror maps it there). Anything else: 403 DENIED, before any upstream
is asked. /v2/ (the ping) is always allowed.
Tested by allowlist_spec.lua beside it; allowlist.json runs it.
]]
local regfacade = require "regfacade"
local mirror = require "regfacade.mirror"
local rules = require "regfacade.rules"

local allowed = rules.prefix(regfacade.config.options.allow or {})

return {
    authorize = function(req)
        if req.kind == "ping" then
            return true
        end
        local mapped = mirror.resolve(req)
        if allowed(req.repository) or (mapped and allowed(mapped.repository)) then
            return true
        end
        return regfacade.deny(403, "DENIED", req.repository .. " is not on this mirror's allow-list")
    end,

    resolve = function(req)
        return mirror.resolve(req)
    end,
}
