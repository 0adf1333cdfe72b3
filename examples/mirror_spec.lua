-- examples/mirror.lua: the policy users copy, run by the server's own code
-- (testing.policy). It answers exactly like the embedded default policy
-- (lua/regfacade/default.lua), over every rule, and as its comments say
-- with mirror.json.
local testing = require "regfacade.testing"

local EXAMPLE = "examples/mirror.lua"

local configs = {
    ["hub, local and quay with a default"] = "examples/mirror.json",
    ["two upstreams, no default"] = {
        upstreams = { hub = { url = "https://registry-1.docker.io" }, ["local"] = { url = "http://127.0.0.1:5001" } },
    },
    ["one upstream, no default"] = { upstreams = { only = { url = "http://127.0.0.1:5001" } } },
}

local requests = {
    { "alpine", "latest" },
    { "library/alpine", "3.19" },
    { "bitnami/redis", "7" },
    { "hub/alpine", "1" },
    { "local/acme/ide", "1.2" },
    { "local", "1" },
    { "quay/coreos/etcd", "v3" },
    { "only/x", "1" },
    { "alpine", "sha256:" .. string.rep("0", 64) },
    { "alpine", "latest", "docker.io" },
    { "alpine", "latest", "index.docker.io" },
    { "local/acme/ide", "1.2", "registry-1.docker.io" },
    { "acme/ide", "1.2", "127.0.0.1:5001" },
    { "coreos/etcd", "v3", "quay.io:443" },
    { "x", "1", "ghcr.io" },
    { "x", "1", "" },
}

describe("examples/mirror.lua", function()
    for label, cfg in pairs(configs) do
        it("resolves like the default policy: " .. label, function()
            local example = testing.policy(EXAMPLE, { config = cfg })
            local default = testing.policy("lua/regfacade/default.lua", { config = cfg })
            for _, r in ipairs(requests) do
                local req = testing.request { repository = r[1], reference = r[2], ns = r[3], host = "127.0.0.1:5000" }
                assert.are.same(default:resolve(req), example:resolve(req),
                    string.format("%s:%s ns=%s", r[1], r[2], tostring(r[3])))
            end
        end)
    end

    it("answers as documented in its comments", function()
        local policy = testing.policy(EXAMPLE, { config = "examples/mirror.json" })
        local function resolve(repository, reference, ns)
            local r = policy:resolve(testing.request { repository = repository, reference = reference, ns = ns })
            if r.allowed == false then
                return r
            end
            return { r.upstream, r.repository, r.reference }
        end
        assert.are.same({ "local", "acme/ide", "1.2" }, resolve("local/acme/ide", "1.2"))
        assert.are.same({ "hub", "library/alpine", "3.19" }, resolve("alpine", "3.19", "docker.io"))
        assert.are.same({ "hub", "library/local", "1" }, resolve("local", "1"))
        assert.are.same({ allowed = false, status = 404, code = "NAME_UNKNOWN",
                          message = "no upstream is configured for ns=ghcr.io" }, resolve("alpine", "1", "ghcr.io"))
    end)

    it("is refused at load with a config the server refuses", function()
        local ok, err = pcall(testing.policy, EXAMPLE, { config = { upstreams = { only = { url = "http://127.0.0.1:5001" } },
                                                                   default_upstream = "gone" } })
        assert.is_false(ok)
        assert.matches("default_upstream", err, 1, true)
    end)
end)
