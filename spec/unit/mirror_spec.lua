-- regfacade.mirror: the default name mapping (CONTRACT.md "Mapping by the
-- default policy"). Every rule, its precedence and its errors.

local function hub_local_quay()
    return {
        upstreams = {
            hub = { url = "https://registry-1.docker.io", host = "registry-1.docker.io:443",
                    library_prefix = true },
            ["local"] = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001",
                          library_prefix = false },
            quay = { url = "https://quay.io", host = "quay.io:443", library_prefix = false },
        },
        default_upstream = "hub",
        options = {},
    }
end

local function not_found(message)
    return { status = 404, code = "NAME_UNKNOWN", message = message }
end

describe("regfacade.mirror", function()
    local mirror, config

    before_each(function()
        config = hub_local_quay()
        package.loaded["regfacade"] = { config = config, log = function() end }
        package.loaded["regfacade.mirror"] = nil
        mirror = require "regfacade.mirror"
    end)

    after_each(function()
        package.loaded["regfacade"] = nil
        package.loaded["regfacade.mirror"] = nil
    end)

    local function resolve(repository, reference, ns, cfg)
        return mirror.resolve({ method = "GET", kind = "manifest", repository = repository,
                                reference = reference, ns = ns, host = "127.0.0.1:5000",
                                client = { ip = "127.0.0.1" }, headers = {} }, cfg)
    end

    describe("normalize_host", function()
        it("lowercases", function()
            assert.are.equal("quay.io", mirror.normalize_host("Quay.IO"))
        end)

        it("maps the three Docker Hub names to docker.io", function()
            assert.are.equal("docker.io", mirror.normalize_host("docker.io"))
            assert.are.equal("docker.io", mirror.normalize_host("index.docker.io"))
            assert.are.equal("docker.io", mirror.normalize_host("Registry-1.Docker.IO"))
        end)

        it("drops the scheme's default port", function()
            assert.are.equal("quay.io", mirror.normalize_host("quay.io:443", "https"))
            assert.are.equal("docker.io", mirror.normalize_host("registry-1.docker.io:443", "https"))
            assert.are.equal("example.org", mirror.normalize_host("example.org:80", "http"))
            assert.are.equal("example.org", mirror.normalize_host("example.org:443", "HTTPS"))
        end)

        it("keeps other ports, and every port without a scheme", function()
            assert.are.equal("quay.io:443", mirror.normalize_host("quay.io:443"))
            assert.are.equal("quay.io:443", mirror.normalize_host("quay.io:443", "http"))
            assert.are.equal("quay.io:8443", mirror.normalize_host("quay.io:8443", "https"))
            assert.are.equal("quay.io:4430", mirror.normalize_host("quay.io:4430", "https"))
            assert.are.equal("127.0.0.1:5001", mirror.normalize_host("127.0.0.1:5001", "http"))
            assert.are.equal("[::1]:5001", mirror.normalize_host("[::1]:5001", "http"))
            assert.are.equal("[::1]", mirror.normalize_host("[::1]:443", "https"))
        end)

        it("rejects a non-string host", function()
            assert.has_error(function() mirror.normalize_host(nil) end,
                "mirror.normalize_host: host must be a string, got nil")
        end)
    end)

    describe("split_first", function()
        it("splits at the first slash", function()
            local first, rest = mirror.split_first("hub/library/alpine")
            assert.are.equal("hub", first)
            assert.are.equal("library/alpine", rest)
        end)

        it("returns nil as rest for a single component", function()
            local first, rest = mirror.split_first("alpine")
            assert.are.equal("alpine", first)
            assert.is_nil(rest)
        end)

        it("rejects a non-string", function()
            assert.has_error(function() mirror.split_first(42) end,
                "mirror.split_first: repository must be a string, got number")
        end)
    end)

    describe("upstream_host", function()
        it("prefers host, normalized with the url's scheme", function()
            assert.are.equal("docker.io", mirror.upstream_host(config.upstreams.hub))
            assert.are.equal("quay.io", mirror.upstream_host(config.upstreams.quay))
            assert.are.equal("127.0.0.1:5001", mirror.upstream_host(config.upstreams["local"]))
        end)

        it("falls back to the url's authority, without user info", function()
            assert.are.equal("docker.io", mirror.upstream_host({ url = "https://registry-1.docker.io" }))
            assert.are.equal("r.example:5000",
                mirror.upstream_host({ url = "http://u:p@R.example:5000/v2/" }))
        end)

        it("is nil without host or url", function()
            assert.is_nil(mirror.upstream_host({}))
            assert.is_nil(mirror.upstream_host(nil))
        end)
    end)

    describe("rule 1: ?ns=HOST", function()
        it("selects the upstream with that host", function()
            assert.are.same({ upstream = "local", repository = "acme/ide", reference = "1.2" },
                resolve("acme/ide", "1.2", "127.0.0.1:5001"))
        end)

        it("treats the Docker Hub names as one host, in any case", function()
            for _, ns in ipairs({ "docker.io", "index.docker.io", "registry-1.docker.io",
                                  "Docker.IO", "registry-1.docker.io:443" }) do
                assert.are.same({ upstream = "hub", repository = "library/alpine", reference = "3.19" },
                    resolve("alpine", "3.19", ns), "ns=" .. ns)
            end
        end)

        it("equates host:443 and host for an https upstream", function()
            assert.are.equal("quay", resolve("coreos/etcd", "v3", "quay.io").upstream)
            assert.are.equal("quay", resolve("coreos/etcd", "v3", "quay.io:443").upstream)
        end)

        it("matches host and port exactly otherwise", function()
            local res, err = resolve("acme/ide", "1.2", "127.0.0.1:5002")
            assert.is_nil(res)
            assert.are.same(not_found("no upstream is configured for ns=127.0.0.1:5002"), err)
            res = resolve("acme/ide", "1.2", "127.0.0.1")
            assert.is_nil(res)
        end)

        it("answers 404 NAME_UNKNOWN for an unknown ns, never falling back", function()
            local res, err = resolve("alpine", "latest", "ghcr.io")
            assert.is_nil(res)
            assert.are.same(not_found("no upstream is configured for ns=ghcr.io"), err)
        end)

        it("wins over a leading upstream name, which is then not stripped", function()
            assert.are.same({ upstream = "local", repository = "hub/alpine", reference = "x" },
                resolve("hub/alpine", "x", "127.0.0.1:5001"))
        end)

        it("wins over default_upstream", function()
            assert.are.equal("quay", resolve("alpine", "latest", "quay.io").upstream)
        end)

        it("treats an empty ns as absent", function()
            assert.are.equal("local", resolve("local/acme/ide", "1.2", "").upstream)
        end)

        it("picks the same upstream among several with one host, whatever the order", function()
            local function cfg(order, default)
                local ups = {}
                for _, name in ipairs(order) do
                    ups[name] = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001" }
                end
                return { upstreams = ups, default_upstream = default }
            end
            assert.are.equal("a", resolve("r", "t", "127.0.0.1:5001", cfg({ "c", "b", "a" })).upstream)
            assert.are.equal("a", resolve("r", "t", "127.0.0.1:5001", cfg({ "a", "b", "c" })).upstream)
            assert.are.equal("b", resolve("r", "t", "127.0.0.1:5001", cfg({ "c", "a", "b" }, "b")).upstream)
            assert.are.equal("b", mirror.upstream_for_ns("127.0.0.1:5001", cfg({ "a", "b" }, "b")))
        end)

        it("is available alone as upstream_for_ns", function()
            assert.are.equal("hub", mirror.upstream_for_ns("index.docker.io"))
            assert.is_nil(mirror.upstream_for_ns("ghcr.io"))
        end)
    end)

    describe("rule 2: a leading upstream name", function()
        it("selects that upstream and strips the component", function()
            assert.are.same({ upstream = "local", repository = "acme/ide", reference = "1.2" },
                resolve("local/acme/ide", "1.2"))
            assert.are.same({ upstream = "quay", repository = "coreos/etcd", reference = "v3" },
                resolve("quay/coreos/etcd", "v3"))
        end)

        it("wins over default_upstream", function()
            assert.are.equal("hub", config.default_upstream)
            assert.are.equal("local", resolve("local/acme/ide", "1.2").upstream)
        end)

        it("does not strip a repository that is only the upstream name", function()
            assert.are.same({ upstream = "hub", repository = "library/local", reference = "1" },
                resolve("local", "1"))
            config.default_upstream = "quay"
            assert.are.same({ upstream = "quay", repository = "quay", reference = "1" },
                resolve("quay", "1"))
        end)

        it("leaves a first component that names no upstream to rule 3", function()
            assert.are.same({ upstream = "hub", repository = "acme/ide", reference = "1" },
                resolve("acme/ide", "1"))
        end)

        it("compares names exactly (case-sensitive)", function()
            assert.are.equal("hub", resolve("LOCAL/acme", "1").upstream)
        end)

        it("strips only the first component", function()
            assert.are.equal("local/x", resolve("hub/local/x", "1").repository)
        end)
    end)

    describe("rule 3: the default", function()
        it("uses default_upstream", function()
            assert.are.same({ upstream = "hub", repository = "library/alpine", reference = "latest" },
                resolve("alpine", "latest"))
        end)

        it("uses the only upstream when default_upstream is not set", function()
            local cfg = { upstreams = { mine = { url = "http://127.0.0.1:5001", host = "127.0.0.1:5001" } } }
            assert.are.same({ upstream = "mine", repository = "alpine", reference = "1" },
                resolve("alpine", "1", nil, cfg))
        end)

        it("answers 404 when there are several upstreams and no default", function()
            config.default_upstream = nil
            local res, err = resolve("acme/ide", "1.2")
            assert.is_nil(res)
            assert.are.same(not_found('no upstream for repository "acme/ide": neither ns= nor its '
                .. "first path component names an upstream, and default_upstream is not set "
                .. "(upstreams: hub, local, quay)"), err)
            -- rules 1 and 2 still work
            assert.are.equal("local", resolve("local/acme/ide", "1.2").upstream)
            assert.are.equal("quay", resolve("x/y", "1", "quay.io").upstream)
        end)

        it("answers 404 when default_upstream names no upstream", function()
            config.default_upstream = "gone"
            local res, err = resolve("alpine", "latest")
            assert.is_nil(res)
            assert.are.same(not_found('default_upstream "gone" is not a configured upstream '
                .. "(upstreams: hub, local, quay)"), err)
        end)

        it("answers 404 when no upstream is configured", function()
            local res, err = resolve("alpine", "latest", nil, { upstreams = {} })
            assert.is_nil(res)
            assert.are.same(not_found("no upstream is configured"), err)
            res, err = resolve("alpine", "latest", nil, { upstreams = {}, default_upstream = "hub" })
            assert.is_nil(res)
            assert.are.same(not_found('default_upstream "hub" is not a configured upstream '
                .. "(upstreams: none)"), err)
        end)
    end)

    describe("library_prefix", function()
        it("prefixes single-component names when on", function()
            assert.are.equal("library/alpine", resolve("alpine", "1").repository)
            assert.are.equal("library/alpine", resolve("hub/alpine", "1").repository)
            assert.are.equal("library/alpine", resolve("alpine", "1", "docker.io").repository)
        end)

        it("leaves multi-component names alone when on", function()
            assert.are.equal("bitnami/redis", resolve("bitnami/redis", "1").repository)
            assert.are.equal("library/alpine", resolve("library/alpine", "1").repository)
            assert.are.equal("library/alpine", resolve("hub/library/alpine", "1").repository)
        end)

        it("does nothing when off", function()
            assert.are.equal("alpine", resolve("local/alpine", "1").repository)
            assert.are.equal("alpine", resolve("alpine", "1", "quay.io").repository)
            config.upstreams.hub.library_prefix = false
            assert.are.equal("alpine", resolve("alpine", "1").repository)
        end)

        it("defaults to on for Docker Hub hosts only when the config leaves it unset", function()
            local cfg = { upstreams = {
                hub = { url = "https://registry-1.docker.io" },
                other = { url = "http://127.0.0.1:5001" },
            }, default_upstream = "hub" }
            assert.are.equal("library/alpine", resolve("alpine", "1", nil, cfg).repository)
            assert.are.equal("alpine", resolve("other/alpine", "1", nil, cfg).repository)
        end)

        it("can be forced on for another host", function()
            config.upstreams["local"].library_prefix = true
            assert.are.equal("library/alpine", resolve("local/alpine", "1").repository)
        end)
    end)

    describe("resolve", function()
        it("passes the reference through: tag, digest or nil", function()
            local digest = "sha256:" .. string.rep("a", 64)
            assert.are.equal("v1.0", resolve("alpine", "v1.0").reference)
            assert.are.equal(digest, resolve("alpine", digest).reference)
            assert.is_nil(resolve("alpine", nil).reference)
        end)

        it("returns exactly upstream, repository and reference", function()
            local res = resolve("alpine", "1")
            local keys = {}
            for k in pairs(res) do keys[#keys + 1] = k end
            table.sort(keys)
            assert.are.same({ "reference", "repository", "upstream" }, keys)
        end)

        it("reads require('regfacade').config at call time", function()
            assert.are.equal("hub", resolve("alpine", "1").upstream)
            package.loaded["regfacade"] = { config = {
                upstreams = { only = { url = "http://127.0.0.1:5009", host = "127.0.0.1:5009" } },
            } }
            assert.are.same({ upstream = "only", repository = "alpine", reference = "1" },
                resolve("alpine", "1"))
        end)

        it("changes neither req nor the config", function()
            local req = { repository = "local/alpine", reference = "1", ns = nil }
            local before = hub_local_quay()
            mirror.resolve(req)
            assert.are.same({ repository = "local/alpine", reference = "1" }, req)
            assert.are.same(before, config)
        end)

        it("creates no globals", function()
            local before = {}
            for k in pairs(_G) do before[k] = true end
            resolve("alpine", "1")
            resolve("local/x", "1")
            resolve("x", "1", "nowhere")
            mirror.normalize_host("a")
            mirror.split_first("a/b")
            for k in pairs(_G) do
                assert.is_true(before[k] == true, "new global " .. tostring(k))
            end
        end)

        it("raises a clear error for a malformed request or config", function()
            assert.has_error(function() mirror.resolve(nil) end,
                "mirror.resolve: req must be a table, got nil")
            assert.has_error(function() mirror.resolve({ reference = "1" }) end,
                "mirror.resolve: req.repository must be a non-empty string, got nil")
            assert.has_error(function() mirror.resolve({ repository = "" }) end,
                "mirror.resolve: req.repository must be a non-empty string, got an empty string")
            assert.has_error(function() mirror.resolve({ repository = "a", ns = 5 }) end,
                "mirror.resolve: req.ns must be a string or nil, got number")
            assert.has_error(function() mirror.resolve({ repository = "a" }, { }) end,
                "mirror.resolve: configuration must be a table with an `upstreams` table")
        end)
    end)
end)
