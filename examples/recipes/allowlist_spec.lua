-- allowlist.lua run by the server's code (testing.policy) with allowlist.json.
local testing = require "regfacade.testing"

describe("examples/recipes/allowlist.lua", function()
    it("lets listed prefixes through and refuses the rest before any upstream", function()
        local policy = testing.policy("examples/recipes/allowlist.lua", { config = "examples/recipes/allowlist.json" })
        assert.is_true(policy:authorize(testing.request { repository = "acme/app" }).allowed)
        assert.is_true(policy:authorize(testing.request { repository = "alpine" }).allowed)
        assert.is_true(policy:authorize(testing.request { kind = "ping", repository = nil }).allowed)
        local a = policy:authorize(testing.request { repository = "evil/app" })
        assert.are.same({ false, 403, "DENIED", "evil/app is not on this mirror's allow-list" },
            { a.allowed, a.status, a.code, a.message })
        local r = policy:resolve(testing.request { repository = "alpine" })
        assert.are.same({ "hub", "library/alpine", "latest" }, { r.upstream, r.repository, r.reference })
    end)

    it("decides on the repository the name maps to (req.target), whichever form it is asked in", function()
        local policy = testing.policy("examples/recipes/allowlist.lua", {
            config = { upstreams = { hub = { url = "https://registry-1.docker.io" },
                                     acme = { url = "http://127.0.0.1:5001" } },
                       default_upstream = "hub" },
            options = { allow = { "acme/" } } })
        -- "acme/secret" is repository "secret" on upstream acme: not listed.
        assert.is_false(policy:authorize(testing.request { repository = "acme/secret" }).allowed)
        assert.is_true(policy:authorize(testing.request { repository = "hub/acme/app" }).allowed)
        assert.is_true(policy:authorize(testing.request { repository = "acme/app", ns = "docker.io" }).allowed)
        policy:close()
    end)
end)
