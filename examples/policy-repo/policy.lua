--[[
policy.lua: a pull-through mirror that serves only some repositories.

Options (config policy.options):
  allow = { "acme/", "library/" }   upstream repository prefixes clients may pull

Names map as regfacade's own mirror maps them (?ns=, a leading upstream
name, default_upstream; Docker Hub's "library/"), and authorize decides on
the name the request maps to, so "/v2/local/secret/x" and "/v2/secret/x"
are refused alike. Tested by spec/policy_spec.lua: `regfacade-busted`.
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
        local mapped = mirror.resolve(req)
        if mapped and allowed(mapped.repository) then
            return true
        end
        return regfacade.deny(403, "DENIED", req.repository .. " is not served by this mirror")
    end,

    resolve = function(req)
        return mirror.resolve(req)
    end,
}
