-- examples/mirror.lua: the policy users copy. It must load like a policy
-- file (a chunk returning a table of hooks, needing no global but require)
-- and resolve exactly like the embedded default, over every rule.

local EXAMPLE = "examples/mirror.lua"

-- Loads the example as the core would: a chunk with only `require` in
-- its environment, so a stray global use fails here.
local function load_example()
    local chunk = assert(loadfile(EXAMPLE, "t", { require = require }))
    return chunk()
end

local configs = {
    ["hub, local and quay with a default"] = {
        upstreams = {
            hub = { url = "https://registry-1.docker.io", host = "registry-1.docker.io:443",
                    library_prefix = true },
            ["local"] = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001",
                          library_prefix = false },
            quay = { url = "https://quay.io", host = "quay.io:443", library_prefix = false },
        },
        default_upstream = "hub",
    },
    ["two upstreams, no default"] = {
        upstreams = {
            hub = { url = "https://registry-1.docker.io", host = "registry-1.docker.io:443",
                    library_prefix = true },
            ["local"] = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001",
                          library_prefix = false },
        },
    },
    ["one upstream, no default"] = {
        upstreams = { only = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001" } },
    },
    ["a default that names no upstream"] = {
        upstreams = { only = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001" } },
        default_upstream = "gone",
    },
    ["no upstreams"] = { upstreams = {} },
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
    before_each(function()
        package.loaded["regfacade.mirror"] = nil
        package.loaded["regfacade.default"] = nil
    end)

    after_each(function()
        package.loaded["regfacade"] = nil
        package.loaded["regfacade.mirror"] = nil
        package.loaded["regfacade.default"] = nil
    end)

    it("loads with nothing but require and returns a table of hooks", function()
        package.loaded["regfacade"] = { config = configs["one upstream, no default"],
                                        log = function() end }
        local policy = load_example()
        assert.is_table(policy)
        assert.is_function(policy.resolve)
        for k, v in pairs(policy) do
            assert.is_true(k == "authorize" or k == "resolve" or k == "rewrite",
                "unexpected field " .. tostring(k))
            assert.is_function(v)
        end
    end)

    for label, cfg in pairs(configs) do
        it("resolves like the default policy: " .. label, function()
            package.loaded["regfacade"] = { config = cfg, log = function() end }
            local example = load_example()
            local default = require "regfacade.default"
            for _, r in ipairs(requests) do
                local req = { method = "GET", kind = "manifest", repository = r[1], reference = r[2],
                              ns = r[3], host = "127.0.0.1:5000", client = { ip = "127.0.0.1" },
                              headers = {} }
                local want = { default.resolve(req) }
                local got = { example.resolve(req) }
                assert.are.same(want, got, string.format("%s:%s ns=%s", r[1], r[2], tostring(r[3])))
            end
        end)
    end

    it("answers as documented in its comments", function()
        package.loaded["regfacade"] = { config = configs["hub, local and quay with a default"],
                                        log = function() end }
        local policy = load_example()
        local function resolve(repository, reference, ns)
            return policy.resolve({ kind = "manifest", repository = repository,
                                    reference = reference, ns = ns })
        end
        assert.are.same({ upstream = "local", repository = "acme/ide", reference = "1.2" },
            resolve("local/acme/ide", "1.2"))
        assert.are.same({ upstream = "hub", repository = "library/alpine", reference = "3.19" },
            resolve("alpine", "3.19", "docker.io"))
        assert.are.same({ upstream = "hub", repository = "library/local", reference = "1" },
            resolve("local", "1"))
        local res, err = resolve("alpine", "1", "ghcr.io")
        assert.is_nil(res)
        assert.are.same({ status = 404, code = "NAME_UNKNOWN",
                          message = "no upstream is configured for ns=ghcr.io" }, err)
    end)
end)
