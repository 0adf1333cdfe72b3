--[[
examples/recipes/tenant_upstream.lua: an upstream per tenant.

A tenant is the first component of the requested name: /v2/<tenant>/<repo>.
Options: tenants = { acme = "acme-registry", globex = "globex-registry" }
maps tenants to configured upstreams; the tenant component is dropped
upstream ("acme/app" is "app" on acme-registry). Unknown tenants: 404
NAME_UNKNOWN.
Tested by tenant_upstream_spec.lua beside it; tenant_upstream.json runs it.
]]
local regfacade = require "regfacade"

return {
    resolve = function(req)
        local tenant, rest = req.repository:match("^([^/]+)/(.+)$")
        local upstream = tenant and (regfacade.config.options.tenants or {})[tenant]
        if not upstream then
            return nil, { status = 404, code = "NAME_UNKNOWN",
                          message = "no tenant for " .. req.repository .. " (/v2/<tenant>/<repository>)" }
        end
        return { upstream = upstream, repository = rest, reference = req.reference }
    end,
}
