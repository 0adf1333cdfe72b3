--[[
examples/recipes/allowlist.lua: only some repositories may be pulled.

Options: allow = { "library/", "acme/" }: repository name prefixes as they
are on the upstream (req.target: "library/" matches "alpine" on Docker Hub
since the mirror maps it there; "hub/acme/x" and "acme/x?ns=docker.io" are
both "acme/x"). Anything else: 403 DENIED, before any upstream is asked.
/v2/ (the ping) is always allowed.
Tested by allowlist_spec.lua beside it; allowlist.json runs it.
]]
local regfacade = require "regfacade"
local mirror = require "regfacade.mirror"
local rules = require "regfacade.rules"

local allowed = rules.prefix(regfacade.config.options.allow or {})

return {
    authorize = function(req)
        if req.kind == "ping" or req.repository == nil then -- the ping, and the catalog as a whole
            return true
        end
        if req.target and allowed(req.target.repository) then
            return true
        end
        return regfacade.deny(403, "DENIED", req.repository .. " is not on this mirror's allow-list")
    end,

    resolve = function(req)
        return mirror.resolve(req)
    end,
}
