-- regfacade.specs: a spec to a resolve answer and a rewrite (docs/specs.md).
-- Specs are decoded with the server's own codec (regfacade.json through
-- regfacade.testing), so tables, null and key order are what hooks get.
local testing = require "regfacade.testing"
local json = testing.json

local BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

local function spec_of(text)
    return json.decode(text)
end

local function env_list(cfg)
    local out = {}
    for i, e in ipairs(cfg.config.Env or {}) do
        out[i] = e
    end
    return out
end

describe("regfacade.specs", function()
    local specs

    before_each(function()
        package.loaded["regfacade"] = {
            config = { upstreams = { ["local"] = {}, hub = {} }, default_upstream = "local", options = {} },
            null = json.null,
            log = function() end,
        }
        package.loaded["regfacade.specs"] = nil
        package.loaded["regfacade.image"] = nil
        specs = require "regfacade.specs"
    end)

    after_each(function()
        package.loaded["regfacade"] = nil
        package.loaded["regfacade.specs"] = nil
    end)

    describe("SCRATCH", function()
        -- The exact bytes src/specs.c stores; their digests must never change.
        local function scratch(arch)
            local cfg = '{"created":"1970-01-01T00:00:00Z","architecture":"' .. arch .. '","os":"linux","config":{},'
                .. '"rootfs":{"type":"layers","diff_ids":[]},"history":[]}'
            local man = '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{'
                .. '"mediaType":"application/vnd.oci.image.config.v1+json","digest":"' .. testing.core.digest(cfg)
                .. '","size":' .. #cfg .. '},"layers":[]}'
            return { manifest_text = man, config_text = cfg }
        end

        it("names the empty base of each platform by the digest of its bytes", function()
            assert.are.equal(testing.core.digest(scratch("amd64").manifest_text), specs.SCRATCH["linux/amd64"])
            assert.are.equal(testing.core.digest(scratch("arm64").manifest_text), specs.SCRATCH["linux/arm64"])
            assert.are.equal("sha256:584a3e8bfbef76e0cd02576a494bcf71d3810fc9c43f8853b9379c2946d4bb3b",
                specs.SCRATCH["linux/amd64"])
        end)

        it("assembles layers on it into a valid image", function()
            local tools = testing.layer("tools")
            local spec = spec_of('{"base":null,"layers":[{"blob":"' .. tools.digest .. '","size":' .. tools.size
                .. ',"media_type":"' .. tools.media_type .. '","diff_id":"' .. tools.diff_id
                .. '","upstream":"hub"}],"env":{"PATH":"/tools/bin"}}')
            local req = testing.request { repository = "remote/bare" }
            local policy = {
                resolve = function(r) return specs.resolve(r, spec) end,
                rewrite = function(img) specs.rewrite(img, spec) end,
            }
            local out = testing.run(policy, req, scratch("amd64"))
            assert.are.same({ tools.digest }, { out.manifest.layers[1].digest })
            assert.are.equal(1, #out.manifest.layers)
            assert.are.same({ tools.diff_id }, { out.config.rootfs.diff_ids[1] })
            assert.are.same({ "PATH=/tools/bin" }, env_list(out.config))
            assert.are.equal(1, #out.config.history)
            assert.are.equal("1970-01-01T00:00:00Z", out.config.history[1].created)
        end)
    end)

    describe("id_from", function()
        it("takes what follows the prefix", function()
            assert.are.equal("ws-123", specs.id_from("remote/ws-123", "remote/"))
            assert.are.equal("a/b", specs.id_from("remote/a/b", "remote/")) -- the core refuses that id
            assert.is_nil(specs.id_from("remote/", "remote/"))
            assert.is_nil(specs.id_from("library/alpine", "remote/"))
            assert.is_nil(specs.id_from("remotex/a", "remote/"))
        end)

        it("checks its arguments", function()
            assert.has_error(function() specs.id_from(nil, "remote/") end,
                "specs.id_from: repository and prefix must be strings")
        end)
    end)

    describe("split_ref", function()
        it("splits upstream, repository and tag or digest", function()
            assert.are.same({ "local", "acme/app", "1.0" }, { specs.split_ref("local/acme/app:1.0") })
            assert.are.same({ "local", "acme/app", "latest" }, { specs.split_ref("local/acme/app") })
            local dg = "sha256:" .. string.rep("ab", 32)
            assert.are.same({ "hub", "library/alpine", dg }, { specs.split_ref("hub/library/alpine@" .. dg) })
            assert.are.same({ "local", "host:5000/x", "latest" }, { specs.split_ref("local/host:5000/x") })
        end)

        it("refuses what is not UPSTREAM/repository", function()
            assert.has_error(function() specs.split_ref("alpine") end)
            assert.has_error(function() specs.split_ref(42) end)
        end)
    end)

    describe("resolve", function()
        local req = testing.request { repository = "remote/ws-1", reference = "latest" }

        it("puts the base first unless the spec places it", function()
            local spec = spec_of('{"base":"local/acme/app:1.0","layers":["supervisor",{"image":"hub/ide:1","skip":1}]}')
            assert.are.same({
                upstream = "local", repository = "acme/app", reference = "1.0",
                layers = { "base", "supervisor", { image = "hub/ide:1", skip = 1 } },
            }, specs.resolve(req, spec))
            spec = spec_of('{"base":"local/acme/app:1.0","layers":["supervisor","base"]}')
            assert.are.same({ "supervisor", "base" }, specs.resolve(req, spec).layers)
            spec = spec_of('{"base":"local/acme/app:1.0"}')
            assert.are.same({ "base" }, specs.resolve(req, spec).layers)
        end)

        it("hands back plain tables (no JSON metatables) in layers", function()
            local spec = spec_of('{"base":"local/a:1","layers":[{"file":"/opt/l.tar","platforms":["linux/amd64"]}]}')
            local l = specs.resolve(req, spec).layers[2]
            assert.is_nil(getmetatable(l))
            assert.is_nil(getmetatable(l.platforms))
            assert.are.same({ file = "/opt/l.tar", platforms = { "linux/amd64" } }, l)
        end)

        it("builds an image without base on the empty base", function()
            local spec = spec_of('{"base":null,"layers":["supervisor"]}')
            assert.are.same({
                upstream = "local", repository = "regfacade/scratch", reference = specs.SCRATCH["linux/amd64"],
                layers = { "supervisor" },
            }, specs.resolve(req, spec))
            spec = spec_of('{"layers":["supervisor"],"platform":"linux/arm64"}')
            assert.are.equal(specs.SCRATCH["linux/arm64"], specs.resolve(req, spec).reference)
            assert.are.equal("hub", specs.resolve(req, spec, { upstream = "hub" }).upstream)
            assert.has_error(function() specs.resolve(req, spec_of('{"layers":["s"],"platform":"linux/s390x"}')) end)
        end)

        it("without default_upstream, names the first upstream by name", function()
            package.loaded["regfacade"].config.default_upstream = nil
            assert.are.equal("hub", specs.resolve(req, spec_of('{"layers":["s"]}')).upstream)
        end)

        it("passes a manifest digest through, and ignores the tag", function()
            local dg = "sha256:" .. string.rep("cd", 32)
            local spec = spec_of('{"base":"local/acme/app:1.0"}')
            assert.are.equal(dg, specs.resolve(testing.request { repository = "remote/ws-1", reference = dg }, spec)
                .reference)
            assert.are.equal("1.0", specs.resolve(testing.request { repository = "remote/ws-1", reference = "v9" },
                spec).reference)
            -- a blob request's digest is not a manifest reference
            assert.are.equal("1.0", specs.resolve(testing.request { repository = "remote/ws-1", reference = dg,
                                                                    kind = "blob" }, spec).reference)
        end)

        it("checks its options", function()
            assert.has_error(function() specs.resolve(req, {}, { colour = 1 }) end,
                'specs.resolve: unknown option "colour" (known: upstream)')
        end)
    end)

    describe("rewrite", function()
        local function run(spec_text, base_env, layers, stack_layers)
            local spec = spec_of(spec_text)
            local base = testing.oci_image { layers = 1, env = base_env or { "PATH=" .. BASE_PATH, "HOME=/root" },
                                             labels = { keep = "yes", drop = "x" } }
            local policy = {
                resolve = function() return { layers = stack_layers or { "base" } } end,
                rewrite = function(img) specs.rewrite(img, spec) end,
            }
            return testing.run(policy, testing.request {}, base, layers)
        end

        it("sets, unsets, prepends and appends env in the spec's order", function()
            local out = run('{"env":{"PATH":{"prepend":"/ide/bin:"},"HOME":null,"EDITOR":"code",'
                .. '"MANPATH":{"append":":/ide/man"},"A":"1"}}')
            assert.are.same({ "PATH=/ide/bin:" .. BASE_PATH, "EDITOR=code", "MANPATH=:/ide/man", "A=1" },
                env_list(out.config))
        end)

        it("sets and removes labels and annotations", function()
            local out = run('{"labels":{"drop":null,"new":"1"},"annotations":{"io.example/a":"b","gone":null}}')
            assert.are.equal("yes", out.config.config.Labels.keep)
            assert.is_nil(out.config.config.Labels.drop)
            assert.are.equal("1", out.config.config.Labels.new)
            assert.are.equal("b", out.manifest.annotations["io.example/a"])
        end)

        it("applies added images' env modifiers first, then the spec's env", function()
            local ide_cfg = testing.oci_image { env = { "GITPOD_ENV_PREPEND_PATH=/ide/bin/remote-cli:",
                                                        "GITPOD_ENV_SET_EDITOR=/ide/bin/code" } }.config
            local ide = testing.layer { name = "ide", config = ide_cfg }
            local out = run('{"env":{"PATH":{"prepend":"/ide/bin:"},"EDITOR":"vi"}}', nil,
                { ["hub/ide:1"] = { ide } }, { "base", { image = "hub/ide:1" } })
            assert.are.same({ "PATH=/ide/bin:/ide/bin/remote-cli:" .. BASE_PATH, "HOME=/root", "EDITOR=vi" },
                env_list(out.config))
        end)

        it("leaves everything else alone, and the same spec gives the same bytes", function()
            local a = run('{"env":{"B":"2","A":"1"},"free":{"form":[1,2]}}')
            local b = run('{"env":{"B":"2","A":"1"},"free":{"form":[1,2]}}')
            assert.are.equal(a.config_text, b.config_text)
            assert.are.same({ "PATH=" .. BASE_PATH, "HOME=/root", "B=2", "A=1" }, env_list(a.config))
            assert.are.same({ "/bin/sh" }, { a.config.config.Cmd[1] })
        end)

        it("checks its arguments", function()
            assert.has_error(function() specs.rewrite(nil, {}) end, "specs.rewrite: img and spec must be tables")
            assert.has_error(function() specs.rewrite({}, {}, { nope = true }) end)
        end)
    end)
end)
