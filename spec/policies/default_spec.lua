-- regfacade.default: the embedded policy used when the config names none.
-- It must be exactly regfacade.mirror's mapping, read from regfacade.config.

local function config()
    return {
        upstreams = {
            hub = { url = "https://registry-1.docker.io", host = "registry-1.docker.io:443",
                    library_prefix = true },
            ["local"] = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001",
                          library_prefix = false },
        },
        default_upstream = "hub",
        options = {},
    }
end

local function req(repository, reference, ns)
    return { method = "GET", kind = "manifest", repository = repository, reference = reference,
             ns = ns, host = "127.0.0.1:5000", client = { ip = "127.0.0.1" }, headers = {} }
end

describe("regfacade.default", function()
    local policy, cfg

    before_each(function()
        cfg = config()
        package.loaded["regfacade"] = { config = cfg, log = function() end }
        package.loaded["regfacade.mirror"] = nil
        package.loaded["regfacade.default"] = nil
        policy = require "regfacade.default"
    end)

    after_each(function()
        package.loaded["regfacade"] = nil
        package.loaded["regfacade.mirror"] = nil
        package.loaded["regfacade.default"] = nil
    end)

    it("is a table of hooks with resolve only", function()
        assert.is_table(policy)
        assert.is_function(policy.resolve)
        for k in pairs(policy) do
            assert.are.equal("resolve", k)
        end
    end)

    it("maps Docker Hub names with library/", function()
        assert.are.same({ upstream = "hub", repository = "library/alpine", reference = "3.19" },
            policy.resolve(req("alpine", "3.19")))
    end)

    it("maps ?ns= to the upstream with that host", function()
        assert.are.same({ upstream = "local", repository = "acme/ide", reference = "1.2" },
            policy.resolve(req("acme/ide", "1.2", "127.0.0.1:5001")))
        assert.are.same({ upstream = "hub", repository = "library/busybox", reference = "1" },
            policy.resolve(req("busybox", "1", "docker.io")))
    end)

    it("maps a leading upstream name, stripped", function()
        assert.are.same({ upstream = "local", repository = "acme/ide", reference = "1.2" },
            policy.resolve(req("local/acme/ide", "1.2")))
    end)

    it("answers 404 NAME_UNKNOWN for an unknown ns", function()
        local res, err = policy.resolve(req("alpine", "1", "ghcr.io"))
        assert.is_nil(res)
        assert.are.same({ status = 404, code = "NAME_UNKNOWN",
                          message = "no upstream is configured for ns=ghcr.io" }, err)
    end)

    it("follows regfacade.config as it is at call time", function()
        cfg.default_upstream = "local"
        assert.are.same({ upstream = "local", repository = "alpine", reference = "1" },
            policy.resolve(req("alpine", "1")))
        package.loaded["regfacade"] = { config = { upstreams = {
            solo = { url = "http://127.0.0.1:5009", host = "127.0.0.1:5009" } } } }
        assert.are.same({ upstream = "solo", repository = "alpine", reference = "1" },
            policy.resolve(req("alpine", "1")))
    end)

    it("decides like regfacade.mirror.resolve", function()
        local mirror = require "regfacade.mirror"
        for _, r in ipairs({ req("alpine", "1"), req("local/x/y", "2"), req("x/y", "3", "docker.io"),
                             req("local", "4"), req("a", "5", "nowhere:1") }) do
            assert.are.same({ mirror.resolve(r) }, { policy.resolve(r) })
        end
    end)
end)
