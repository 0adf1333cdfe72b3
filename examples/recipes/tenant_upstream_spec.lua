-- tenant_upstream.lua run by the server's code (testing.policy) with
-- tenant_upstream.json: an upstream the config lacks is the spec's failure,
-- as it is a 500 in the server.
local testing = require "regfacade.testing"

local function load(tenants)
    return testing.policy("examples/recipes/tenant_upstream.lua",
                          { config = "examples/recipes/tenant_upstream.json", options = tenants and { tenants = tenants } })
end

describe("examples/recipes/tenant_upstream.lua", function()
    it("picks the tenant's upstream and drops the tenant from the name", function()
        local r = load():resolve(testing.request { repository = "acme/team/app", reference = "v1" })
        assert.are.same({ "acme-registry", "team/app", "v1" }, { r.upstream, r.repository, r.reference })
        local refused = load():resolve(testing.request { repository = "initech/app" })
        assert.are.same({ false, 404, "NAME_UNKNOWN" }, { refused.allowed, refused.status, refused.code })
    end)

    it("fails, as the server would, for a tenant mapped to an upstream the config lacks", function()
        local ok, err = pcall(function()
            return load({ acme = "no-such-registry" }):resolve(testing.request { repository = "acme/app" })
        end)
        assert.is_false(ok)
        assert.matches('resolve returned upstream "no-such-registry", which is not configured', err, 1, true)
    end)
end)
