-- Image assembly through regfacade.core: the server's own C code
-- (image_assemble, image_rewrite_run, image_finish) as a Lua C module, on
-- real-looking Docker and OCI manifests and configs (spec/fixtures/).
local testing = require "regfacade.testing"
local image = require "regfacade.image"
local core = testing.core
local json = testing.json

local function fixture(name)
    local f = assert(io.open("spec/fixtures/" .. name .. ".json", "rb"))
    local s = f:read("a")
    f:close()
    return s
end

local OCI_M, OCI_C = fixture("oci_manifest"), fixture("oci_config")
local DOCKER_M, DOCKER_C = fixture("docker_manifest"), fixture("docker_config")

local OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
local OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
local OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
local DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
local DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

local IDE = testing.layer("ide")
local SUP = testing.layer { name = "supervisor", media_type = DOCKER_GZIP, created_by = "COPY supervisor /.supervisor/",
    comment = "regfacade: supervisor" }

-- Plain-text replace of the first occurrence (no patterns).
local function replace(s, old, new)
    local i, j = s:find(old, 1, true)
    assert(i, "not found: " .. old)
    return s:sub(1, i - 1) .. new .. s:sub(j + 1)
end

local function non_empty_history(cfg)
    local n = 0
    for _, h in ipairs(cfg.history) do
        if h.empty_layer ~= true then
            n = n + 1
        end
    end
    return n
end

local digests = testing.layer_digests

local function assemble(mt, ct, stack)
    local m, c, md, cd = core.assemble(mt, ct, stack)
    return { manifest_text = m, config_text = c, manifest_digest = md, config_digest = cd,
             manifest = json.decode(m), config = json.decode(c) }
end

local function assert_aligned(out)
    assert.are.equal(#out.manifest.layers, #out.config.rootfs.diff_ids)
    if out.config.history ~= nil then
        assert.are.equal(#out.manifest.layers, non_empty_history(out.config))
    end
end

describe("regfacade.core.assemble", function()
    local base_oci = json.decode(OCI_M)
    local base_docker = json.decode(DOCKER_M)

    it("appends, prepends and interleaves, keeping layers, diff_ids and history aligned", function()
        for _, case in ipairs {
            { OCI_M, OCI_C, base_oci }, { DOCKER_M, DOCKER_C, base_docker },
        } do
            local mt, ct, base = case[1], case[2], case[3]
            local b = digests(base)
            local function want(...)
                local list = {}
                for _, x in ipairs({ ... }) do
                    if x == "base" then
                        for _, d in ipairs(b) do list[#list + 1] = d end
                    else
                        list[#list + 1] = x.digest
                    end
                end
                return list
            end
            for _, stack in ipairs {
                { "base", IDE }, { IDE, "base" }, { SUP, "base", IDE }, { IDE, SUP, "base" }, { "base" },
            } do
                local out = assemble(mt, ct, stack)
                assert.are.same(want(table.unpack(stack)), digests(out.manifest))
                assert_aligned(out)
                -- diff_ids follow the stack too
                local k = 0
                for _, x in ipairs(stack) do
                    if x == "base" then
                        k = k + #b
                    else
                        k = k + 1
                        assert.are.equal(x.diff_id, out.config.rootfs.diff_ids[k])
                    end
                end
            end
        end
    end)

    it("adds one history entry per added layer, dated like the base, in place", function()
        local out = assemble(OCI_M, OCI_C, { SUP, "base", IDE })
        local h = out.config.history
        assert.are.equal(8, #h)
        assert.are.same({ created = "2024-03-01T10:00:00.123456789Z", created_by = "COPY supervisor /.supervisor/",
                          comment = "regfacade: supervisor" }, h[1])
        assert.are.equal("ARG VERSION=1.2", h[2].created_by)
        assert.are.same({ created = "2024-03-01T10:00:00.123456789Z",
                          created_by = "regfacade: added layer " .. IDE.digest }, h[8])
        assert.are.same({ "created", "created_by", "comment" }, getmetatable(h[1]).__jsonorder)
    end)

    it("without base builds the listed layers alone, keeping the base's empty_layer history first", function()
        local out = assemble(DOCKER_M, DOCKER_C, { IDE, SUP })
        assert.are.same({ IDE.digest, SUP.digest }, digests(out.manifest))
        assert.are.same({ IDE.diff_id, SUP.diff_id }, out.config.rootfs.diff_ids)
        assert.are.same({ '/bin/sh -c #(nop)  CMD ["bash"]', "/bin/sh -c #(nop)  ENV LANG=C.UTF-8",
                          "regfacade: added layer " .. IDE.digest, "COPY supervisor /.supervisor/" },
            { out.config.history[1].created_by, out.config.history[2].created_by,
              out.config.history[3].created_by, out.config.history[4].created_by })
        assert_aligned(out)
        -- an empty stack: empty arrays stay arrays
        out = assemble(OCI_M, OCI_C, {})
        assert.truthy(out.manifest_text:find('"layers":[]', 1, true))
        assert.truthy(out.config_text:find('"diff_ids":[]', 1, true))
    end)

    it("converts added layers' media types to the manifest's family, both ways", function()
        local tar = testing.layer { name = "t", media_type = OCI_TAR }
        local zstd = testing.layer { name = "z", media_type = OCI_ZSTD }
        local nd = testing.layer { name = "n", media_type = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip" }
        local out = assemble(DOCKER_M, DOCKER_C, { "base", IDE, tar, zstd, nd })
        local types = {}
        for i, l in ipairs(out.manifest.layers) do types[i] = l.mediaType end
        assert.are.same({ DOCKER_GZIP, DOCKER_GZIP, DOCKER_GZIP, DOCKER_TAR, OCI_ZSTD,
                          "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" }, types)
        -- and Docker's key order for the new descriptors
        assert.are.same({ "mediaType", "size", "digest" }, getmetatable(out.manifest.layers[3]).__jsonorder)

        local dtar = testing.layer { name = "dt", media_type = DOCKER_TAR }
        out = assemble(OCI_M, OCI_C, { SUP, dtar, "base" })
        assert.are.equal(OCI_GZIP, out.manifest.layers[1].mediaType)
        assert.are.equal(OCI_TAR, out.manifest.layers[2].mediaType)
        assert.are.equal(OCI_ZSTD, out.manifest.layers[5].mediaType) -- the base's own
        assert.are.same({ "mediaType", "digest", "size" }, getmetatable(out.manifest.layers[1]).__jsonorder)
    end)

    it("copies urls and annotations onto the added descriptor", function()
        local l = testing.layer { name = "remote", urls = { "https://layers.example.org/remote.tar.gz" },
                                  annotations = { ["org.example.b"] = "2", ["org.example.a"] = "1" } }
        local out = assemble(OCI_M, OCI_C, { "base", l })
        local d = out.manifest_text:match('{"mediaType":"[^"]*","digest":"' .. l.digest:gsub("%p", "%%%0") .. '".-}}')
        assert.are.equal('{"mediaType":"' .. OCI_GZIP .. '","digest":"' .. l.digest .. '","size":' .. l.size ..
            ',"urls":["https://layers.example.org/remote.tar.gz"],"annotations":{"org.example.a":"1",' ..
            '"org.example.b":"2"}}', d)
    end)

    it("returns the digests of what it returns; the manifest names the new config", function()
        local out = assemble(OCI_M, OCI_C, { "base", IDE })
        assert.are.equal(core.digest(out.manifest_text), out.manifest_digest)
        assert.are.equal(core.digest(out.config_text), out.config_digest)
        assert.are.equal(out.config_digest, out.manifest.config.digest)
        assert.are.equal(#out.config_text, out.manifest.config.size)
        assert.are.same({ "mediaType", "digest", "size" }, getmetatable(out.manifest.config).__jsonorder)
    end)

    it("is deterministic: the same inputs give the same bytes, in this process and another", function()
        local a = assemble(OCI_M, OCI_C, { SUP, "base", IDE })
        local b = assemble(OCI_M, OCI_C, { SUP, "base", IDE })
        assert.are.equal(a.manifest_text, b.manifest_text)
        assert.are.equal(a.config_text, b.config_text)
        assert.are.equal(a.manifest_digest, b.manifest_digest)

        local script = os.tmpname()
        local f = assert(io.open(script, "w"))
        f:write([[
            package.path = "lua/?.lua;" .. package.path
            local testing = require "regfacade.testing"
            local function read(n) local f = assert(io.open("spec/fixtures/" .. n .. ".json", "rb"))
                local s = f:read("a") f:close() return s end
            local sup = testing.layer { name = "supervisor",
                media_type = "application/vnd.docker.image.rootfs.diff.tar.gzip",
                created_by = "COPY supervisor /.supervisor/", comment = "regfacade: supervisor" }
            local _, _, md = testing.core.assemble(read("oci_manifest"), read("oci_config"),
                { sup, "base", testing.layer("ide") })
            io.write(md)
        ]])
        f:close()
        local p = assert(io.popen("lua5.4 " .. script))
        local other = p:read("a")
        p:close()
        os.remove(script)
        assert.are.equal(a.manifest_digest, other)
    end)

    it("gives a new digest for a new decision or a new base", function()
        local seen = {}
        for _, out in ipairs {
            assemble(OCI_M, OCI_C, { "base", IDE }),
            assemble(OCI_M, OCI_C, { IDE, "base" }),
            assemble(OCI_M, OCI_C, { "base", IDE, SUP }),
            assemble(OCI_M, OCI_C, { "base", testing.layer { name = "ide", comment = "another comment" } }),
            assemble(OCI_M, OCI_C:gsub('"User":"app"', '"User":"root"'), { "base", IDE }),
            assemble(OCI_M:gsub('"size":1204', '"size":1205'), OCI_C, { "base", IDE }),
        } do
            assert.is_nil(seen[out.manifest_digest])
            seen[out.manifest_digest] = true
        end
    end)

    it("keeps unknown fields, key order, empty arrays and exact numbers", function()
        local out = assemble(OCI_M, OCI_C, { "base", IDE })
        local base_cfg = json.decode(OCI_C)
        assert.are.same(getmetatable(base_cfg).__jsonorder, getmetatable(out.config).__jsonorder)
        assert.truthy(out.config_text:find(
            '"x-vendor":{"build":[],"ratio":0.25,"scale":1e3,"big":18446744073709551615,"none":null}}', 1, true))
        assert.truthy(out.config_text:find('"moby.buildkit.buildinfo.v1":"eyJmcm9udGVuZCI6ImRvY2tlcmZpbGUudjAifQ=="',
            1, true))
        assert.truthy(out.manifest_text:find('"size":9007199254740993', 1, true))
        assert.truthy(out.manifest_text:find('"annotations":{"org.opencontainers.image.base.name":', 1, true))

        out = assemble(DOCKER_M, DOCKER_C, { "base", IDE })
        assert.truthy(out.config_text:find('"Entrypoint":null,"OnBuild":null,"Labels":null},"container":"6e3a', 1, true))
        assert.truthy(out.config_text:find('"ENV LANG=C.UTF-8"],"Image":"sha256:a8a0', 1, true))
        assert.truthy(out.config_text:find('"Labels":{}},"created":', 1, true))
        assert.are.same(getmetatable(json.decode(DOCKER_C)).__jsonorder, getmetatable(out.config).__jsonorder)
    end)

    describe("errors", function()
        local function fails(want, ...)
            local ok, err = pcall(core.assemble, ...)
            assert.is_false(ok)
            assert.are.equal(want, err)
        end

        it("name the stack entry and the field", function()
            fails('regfacade.core: stack[2]: unknown key "blob" (known: media_type, digest, size, diff_id, urls, ' ..
                'annotations, created_by, comment, source, name, config)', OCI_M, OCI_C, { "base", { blob = IDE.digest } })
            fails('regfacade.core: stack[1] is "bsae"; the only string entry is "base"', OCI_M, OCI_C, { "bsae" })
            fails('regfacade.core: stack[1] is a number, expected "base" or a layer table', OCI_M, OCI_C, { 7 })
            fails("regfacade.core: stack[1].digest is missing, expected a string", OCI_M, OCI_C,
                { { media_type = OCI_GZIP, size = 1, diff_id = IDE.diff_id } })
            fails("regfacade.core: stack[1].media_type is a number, expected a string", OCI_M, OCI_C,
                { { media_type = 1, digest = IDE.digest, size = 1, diff_id = IDE.diff_id } })
            fails("regfacade.core: stack[1].size is -1, expected a non-negative integer", OCI_M, OCI_C,
                { { media_type = OCI_GZIP, digest = IDE.digest, size = -1, diff_id = IDE.diff_id } })
            fails("regfacade.core: stack[1].size is 1.5, expected a non-negative integer", OCI_M, OCI_C,
                { { media_type = OCI_GZIP, digest = IDE.digest, size = 1.5, diff_id = IDE.diff_id } })
            fails('regfacade.core: stack[2]: digest "sha256:nope" is not a valid digest', OCI_M, OCI_C,
                { "base", { media_type = OCI_GZIP, digest = "sha256:nope", size = 1, diff_id = IDE.diff_id } })
            fails("regfacade.core: stack[1] (layer " .. IDE.digest .. "): urls is not an array", OCI_M, OCI_C,
                { testing.layer { name = "ide", urls = { a = "x" } } })
            fails('regfacade.core: stack[3]: "base" appears twice (first at stack[1])', OCI_M, OCI_C,
                { "base", IDE, "base" })
        end)

        it("name what is wrong with the base", function()
            fails("regfacade.core: base config has 3 diff_ids for 2 layers", DOCKER_M, OCI_C, { "base" })
            fails("regfacade.core: base manifest: json: unexpected end of input at byte 1", "{", OCI_C, { "base" })
            fails("regfacade.core: base manifest: mediaType application/vnd.oci.image.index.v1+json is an index; " ..
                "assemble each platform's manifest", '{"mediaType":"application/vnd.oci.image.index.v1+json"}', OCI_C,
                { "base" })
        end)
    end)
end)

describe("regfacade.core.assemble_rewrite", function()
    local function run(mt, ct, stack, fn, req)
        local m, c, md, cd = core.assemble_rewrite(mt, ct, stack, fn, req)
        return { manifest_text = m, config_text = c, manifest_digest = md, config_digest = cd,
                 manifest = json.decode(m), config = json.decode(c) }
    end

    it("gives the same bytes as assemble when the hook changes nothing (the Lua round trip is lossless)", function()
        for _, case in ipairs { { OCI_M, OCI_C }, { DOCKER_M, DOCKER_C } } do
            for _, stack in ipairs { { "base", IDE }, { SUP, "base" }, { IDE } } do
                local plain = assemble(case[1], case[2], stack)
                local hooked = run(case[1], case[2], stack, function() end)
                assert.are.equal(plain.manifest_text, hooked.manifest_text)
                assert.are.equal(plain.config_text, hooked.config_text)
                assert.are.equal(plain.manifest_digest, run(case[1], case[2], stack, nil).manifest_digest)
            end
        end
    end)

    it("changes env, labels and entrypoint with regfacade.image and keeps every other byte (OCI)", function()
        local plain = assemble(OCI_M, OCI_C, { "base", IDE })
        local out = run(OCI_M, OCI_C, { "base", IDE }, function(img)
            image.env_prepend(img.config, "PATH", "/ide/bin:")
            image.env_set(img.config, "EDITOR", "code")
            image.label_set(img.config, "org.example.ide", "1.0")
            img.config.config.Entrypoint = { "/ide/bin/supervisor", "run" }
        end)
        local want = plain.config_text
        want = replace(want, '"Env":["PATH=/usr/local/sbin', '"Env":["PATH=/ide/bin:/usr/local/sbin')
        want = replace(want, '"APP_HOME=/srv"]', '"APP_HOME=/srv","EDITOR=code"]')
        want = replace(want, '"org.opencontainers.image.version":"1.2"}',
            '"org.opencontainers.image.version":"1.2","org.example.ide":"1.0"}')
        want = replace(want, '"Entrypoint":["/usr/local/bin/app"]', '"Entrypoint":["/ide/bin/supervisor","run"]')
        assert.are.equal(want, out.config_text)
        -- the manifest changes in its config descriptor only
        local want_m = replace(plain.manifest_text, plain.config_digest, out.config_digest)
        want_m = replace(want_m, '"size":' .. #plain.config_text .. "}", '"size":' .. #out.config_text .. "}")
        assert.are.equal(want_m, out.manifest_text)
        assert.are_not.equal(plain.manifest_digest, out.manifest_digest)
    end)

    it("changes a Docker config the same way, creating Labels where it was null", function()
        local plain = assemble(DOCKER_M, DOCKER_C, { "base", SUP })
        local out = run(DOCKER_M, DOCKER_C, { "base", SUP }, function(img)
            image.env_prepend(img.config, "PATH", "/ide/bin:")
            image.label_set(img.config, "org.example.ide", "1.0")
            img.config.config.Cmd = json.array()
        end)
        local want = plain.config_text
        want = replace(want, '"Env":["PATH=/usr/local/sbin', '"Env":["PATH=/ide/bin:/usr/local/sbin')
        want = replace(want, '"Cmd":["bash"]', '"Cmd":[]')
        want = replace(want, '"Labels":null},"container"', '"Labels":{"org.example.ide":"1.0"}},"container"')
        assert.are.equal(want, out.config_text)
        -- container_config (a field the policy did not touch) is unchanged
        assert.are.same(plain.config.container_config, out.config.container_config)
    end)

    it("lets the hook annotate the manifest", function()
        local out = run(OCI_M, OCI_C, { "base" }, function(img, req)
            image.annotation_set(img.manifest, "org.example.workspace", req.repository)
        end, testing.request { repository = "acme/app" })
        assert.truthy(out.manifest_text:find(
            '"org.opencontainers.image.created":"2024-03-01T10:00:00Z","org.example.workspace":"acme/app"}}', 1, true))
    end)

    it("gives the hook img.layers and req", function()
        local seen
        run(DOCKER_M, DOCKER_C, { IDE, "base", SUP }, function(img, req)
            seen = { layers = img.layers, req = req }
        end, testing.request { repository = "acme/app", reference = "v1" })
        assert.are.equal("acme/app", seen.req.repository)
        assert.are.equal(4, #seen.layers)
        assert.are.same({ media_type = DOCKER_GZIP, digest = IDE.digest, size = IDE.size, diff_id = IDE.diff_id,
                          base = false }, seen.layers[1])
        assert.is_true(seen.layers[2].base)
        assert.are.equal("sha256:fd1cd622bad2c9d0dc0f1c8345f3aa56c14659fe4d192d9a8be61c220daa7862",
            seen.layers[2].diff_id)
        assert.are.equal(9007199254740993, seen.layers[3].size)
        assert.is_false(seen.layers[4].base)
    end)

    it("takes a returned table in place of img", function()
        local out = run(OCI_M, OCI_C, { "base" }, function(img)
            local cfg = img.config
            cfg.config.User = "root"
            return { manifest = img.manifest, config = cfg }
        end)
        assert.are.equal("root", out.config.config.User)
    end)

    it("hands the hook JSON null as json.null and keeps it", function()
        local out = run(DOCKER_M, DOCKER_C, { "base" }, function(img)
            assert.are.equal(json.null, img.config.config.Entrypoint)
            img.config.config.Volumes = json.object()
        end)
        assert.truthy(out.config_text:find('"Image":"sha256:a8a0ea1e2c2fa4ad1d7d5e50cd2d6e4fe4d1a54d8e2eb1d3b0a3b91f1c8ee6e2",' ..
            '"Volumes":{},"WorkingDir":"","Entrypoint":null', 1, true))
    end)

    describe("errors", function()
        local function fails(pattern, fn, plain)
            local ok, err = pcall(core.assemble_rewrite, OCI_M, OCI_C, { "base", IDE }, fn, {})
            assert.is_false(ok)
            if plain then
                assert.are.equal(pattern, err)
            else
                assert.truthy(err:find(pattern), err)
            end
        end

        it("report the hook's own error", function()
            fails("^regfacade%.core: rewrite hook: spec/unit/assemble_spec%.lua:%d+: boom$",
                function() error("boom") end)
            fails("regfacade.core: rewrite hook: raised a table value", function() error({}) end, true)
        end)

        it("name what is wrong with the result", function()
            fails("regfacade.core: rewrite: the hook returned a string; return nothing (edit img) or a table like img",
                function() return "done" end, true)
            fails("regfacade.core: rewrite: img.config is a string, expected a table",
                function(img) img.config = "x" end, true)
            fails("regfacade.core: rewrite: img.config.config.Labels: key 1 (a number) in an object (object keys " ..
                "must be strings; a table is an array only when its keys are exactly 1..n)",
                function(img) img.config.config.Labels[1] = "x" end, true)
            fails("regfacade.core: rewrite: img.manifest.annotations.bad: a function cannot be encoded",
                function(img) img.manifest.annotations.bad = print end, true)
            fails("regfacade.core: rewrite: img.manifest has 3 layers but img.config.rootfs.diff_ids has 4",
                function(img) table.remove(img.manifest.layers) end, true)
            fails("regfacade.core: rewrite: img.config.rootfs.diff_ids is missing or not an array",
                function(img) img.config.rootfs = nil end, true)
        end)

        it("refuse a rewrite that is not a function", function()
            assert.has_error(function() core.assemble_rewrite(OCI_M, OCI_C, { "base" }, "rewrite", {}) end)
        end)
    end)
end)

describe("regfacade.testing", function()
    it("builds requests with defaults and checks option names", function()
        local req = testing.request { repository = "acme/app", headers = { ["User-Agent"] = "containerd/1.6" } }
        assert.are.same({ method = "GET", kind = "manifest", repository = "acme/app", reference = "latest",
                          client = {}, headers = { ["user-agent"] = "containerd/1.6" }, ctx = {} }, req)
        assert.has_error(function() testing.request { repo = "x" } end,
            'testing.request: unknown option "repo" (known: client, credentials, ctx, headers, host, kind, method, ' ..
            'ns, reference, repository, target)')
    end)

    it("gives req.target as the server does before resolve: the mirror's mapping", function()
        testing.host { config = { upstreams = { hub = { url = "https://registry-1.docker.io" },
                                                ["local"] = { url = "http://127.0.0.1:5001" } },
                                  default_upstream = "hub" } }
        local t = testing.request { repository = "local/internal/app" }.target
        assert.are.same({ upstream = "local", repository = "internal/app" }, t)
        t = testing.request { repository = "alpine" }.target
        assert.are.same({ upstream = "hub", repository = "library/alpine" }, t)
        t = testing.request { repository = "internal/app", ns = "127.0.0.1:5001" }.target
        assert.are.same({ upstream = "local", repository = "internal/app" }, t)
        assert.is_false(testing.request { repository = "x", ns = "quay.io" }.target)
        assert.are.same({ upstream = "u", repository = "r" },
                        testing.request { target = { upstream = "u", repository = "r" } }.target)
        testing.reset()
    end)

    it("builds OCI and Docker images whose history lines up", function()
        for _, build in ipairs { testing.oci_image, testing.docker_image } do
            local img = build { layers = 3, empty_layers = 2, env = { "PATH=/usr/bin", "A=1" } }
            assert.are.equal(3, #img.manifest.layers)
            assert.are.equal(5, #img.config.history)
            assert.is_true(img.config.history[2].empty_layer)
            assert.are.equal(3, non_empty_history(img.config))
            assert.are.same({ "PATH=/usr/bin", "A=1" }, img.config.config.Env)
            assert.are.equal(core.digest(img.config_text), img.manifest.config.digest)
            assert.are.equal(core.digest(img.manifest_text), img.digest)
            -- and core assembles them
            assert_aligned(assemble(img.manifest_text, img.config_text, { IDE, "base", SUP }))
        end
        assert.is_nil(testing.oci_image { history = false }.config.history)
        assert.are.equal("application/vnd.docker.distribution.manifest.v2+json",
            testing.docker_image().manifest.mediaType)
        assert.are.equal(json.null, testing.docker_image().config.config.Labels)
        assert.has_error(function() testing.oci_image { layer = 1 } end)
    end)

    describe("run", function()
        local ide_image = { testing.layer("ide-base"), testing.layer("ide-bin"), testing.layer("ide-ext") }
        local layers = {
            supervisor = SUP,
            ["/opt/layers/motd.tar.gz"] = testing.layer("motd"),
            ["local/acme/ide:1.2"] = ide_image,
        }
        local policy = {
            resolve = function(req)
                if req.repository == "forbidden/x" then
                    return nil, "not here"
                end
                return { upstream = "local", repository = req.repository, reference = req.reference,
                         layers = { "base", "supervisor", { file = "/opt/layers/motd.tar.gz" },
                                    { image = "local/acme/ide:1.2", skip = 1 },
                                    { blob = IDE.digest, size = IDE.size, media_type = DOCKER_GZIP,
                                      diff_id = IDE.diff_id } } }
            end,
            rewrite = function(img, req)
                image.env_prepend(img.config, "PATH", "/ide/bin:")
                image.annotation_set(img.manifest, "org.example.workspace", req.repository)
            end,
        }
        local extra = { ["x-team"] = json.object({ name = "ide", quota = 9007199254740993 }, { "name", "quota" }) }

        it("resolves, assembles and rewrites through the core", function()
            local base = testing.oci_image { layers = 2, empty_layers = 1, env = { "PATH=/usr/bin" },
                                             extra_config_fields = extra }
            local out = testing.run(policy, testing.request { repository = "acme/app" }, base, layers)
            assert.are.equal("local", out.decision.upstream)
            local want = digests(base.manifest)
            for _, l in ipairs { SUP, layers["/opt/layers/motd.tar.gz"], ide_image[2], ide_image[3], IDE } do
                want[#want + 1] = l.digest
            end
            assert.are.same(want, digests(out.manifest))
            assert.are.equal(OCI_GZIP, out.manifest.layers[7].mediaType)
            assert_aligned(out)
            assert.are.same({ "PATH=/ide/bin:/usr/bin" }, out.config.config.Env)
            assert.are.equal("acme/app", out.manifest.annotations["org.example.workspace"])
            assert.truthy(out.config_text:find('"x-team":{"name":"ide","quota":9007199254740993}}', 1, true))
            assert.are.equal(core.digest(out.manifest_text), out.manifest_digest)
        end)

        it("is deterministic, and a new decision gives a new digest", function()
            local base = testing.docker_image { layers = 2 }
            local a = testing.run(policy, testing.request { repository = "acme/app" }, base, layers)
            local b = testing.run(policy, testing.request { repository = "acme/app" }, base, layers)
            assert.are.equal(a.manifest_digest, b.manifest_digest)
            local c = testing.run(policy, testing.request { repository = "acme/other" }, base, layers)
            assert.are_not.equal(a.manifest_digest, c.manifest_digest)
            assert.are.equal(a.config_digest, c.config_digest) -- only the manifest annotation differs
        end)

        it("returns the refusal when resolve refuses", function()
            local out, why = testing.run(policy, testing.request { repository = "forbidden/x" },
                testing.oci_image(), layers)
            assert.is_nil(out)
            assert.are.equal("not here", why)
        end)

        it("serves the base alone without hooks", function()
            local base = testing.oci_image { layers = 2 }
            local out = testing.run({}, nil, base)
            local m = core.assemble(base.manifest_text, base.config_text, { "base" })
            assert.are.equal(m, out.manifest_text)
        end)

        it("names a layer missing from the table", function()
            assert.has_error(function()
                testing.run({ resolve = function() return { layers = { "base", "nope" } } end }, nil,
                    testing.oci_image(), layers)
            end, 'testing.run: layers[2] names layer "nope", which is not in the layers table given to run')
        end)
    end)
end)
