--[[
regfacade.testing: the front door for busted specs of policies.

A policy is a pure function of its request, so a spec builds a request and
a fake upstream image, runs the policy through the same C assembly the
server runs (regfacade.core, a Lua C module built by `make lua-core` into
build/lua/regfacade/core.so), and asserts on the manifest and config that
come out.

  local testing = require "regfacade.testing"
  local policy = require "examples.workspace.policy"     -- your policy module

  local base = testing.oci_image{ layers = 2, env = { "PATH=/usr/bin" } }
  local out = testing.run(policy, testing.request{ repository = "acme/app" }, base,
                          { supervisor = testing.layer("supervisor") })
  assert.are.equal("PATH=/ide/bin:/usr/bin", out.config.config.Env[1])

Provided:
  testing.request{...}        a req table as hooks receive it
  testing.layer{...}          a layer descriptor (stack entry)
  testing.oci_image{...}      a fake upstream OCI image
  testing.docker_image{...}   a fake upstream Docker schema2 image
  testing.run(policy, req, base [, layers])   resolve + assembly + rewrite
  testing.core, testing.json  regfacade.core and regfacade.json
  testing.host{...}           a stand-in `regfacade` module (config, log
                              capture, digest, json, shared, crypt_verify,
                              read_file) put in package.loaded
  testing.policy(path, {config=, options=})  the one way to load a policy:
                              the server's own code (config loader, sandbox,
                              answer readers and validation, assembly)
  testing.authorize(p, req)   p:authorize(req) (p from testing.policy)
  testing.log(policy, req [, res])  runs the log hook as the server does
  testing.sandbox{...}        the server's own sandbox (regfacade.sandbox)

Every function checks its option keys: an unknown one is an error naming the
function and the key. Everything is deterministic: the same arguments give
the same bytes.

The C module is found through package.cpath: this module puts
"<build>/lua/?.so" in front, <build> being $REGFACADE_BUILD or "build"
(run busted from the repository root).
]]

local testing = {}

do
    local build = os.getenv("REGFACADE_BUILD")
    if build == nil or build == "" then
        build = "build"
    end
    local entry = build .. "/lua/?.so"
    if not package.cpath:find(entry, 1, true) then
        package.cpath = entry .. ";" .. package.cpath
    end
end

local core = require "regfacade.core"
local json = core.json

testing.core = core
testing.json = json

local sandbox_ok, sandbox_mod = pcall(require, "regfacade.sandbox")

-- A refusal made by regfacade.deny (the server's C value, or its fields as
-- sb:call and regfacade.core hand them back).
local function is_deny(v)
    return sandbox_ok and sandbox_mod.is_deny(v)
end

local OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
local OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
local OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
local DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
local DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
local DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

-- Errors for unknown option keys (sorted, so the message is stable).
local function check_options(fn, opts, known)
    if opts == nil then
        return {}
    end
    if type(opts) ~= "table" then
        error(string.format("testing.%s: options must be a table, got %s", fn, type(opts)), 3)
    end
    for k in pairs(opts) do
        if not known[k] then
            local names = {}
            for name in pairs(known) do
                names[#names + 1] = name
            end
            table.sort(names)
            error(string.format("testing.%s: unknown option %q (known: %s)", fn, tostring(k),
                table.concat(names, ", ")), 3)
        end
    end
    return opts
end

local function set_of(list)
    local s = {}
    for _, v in ipairs(list) do
        s[v] = true
    end
    return s
end

local function copy(t)
    local c = {}
    for k, v in pairs(t or {}) do
        c[k] = v
    end
    return c
end

--[[
testing.request{ method =, kind =, repository =, reference =, ns =, host =,
                 client =, headers =, target = }

A request table as the hooks get it. Defaults: method "GET", kind
"manifest", repository "library/alpine", reference "latest", client {},
headers {} (header names are lowercased, as the server gives them); ns and
host stay nil unless given. target ({ upstream =, repository = }), unless
given, is computed as the server computes it before resolve: when first
read, regfacade.mirror's mapping of the request with the configuration of
require("regfacade") (testing.host), or false when it maps nowhere.
Example:
  local req = testing.request{ repository = "acme/app", client = { user = "ci" } }
  --> req.method == "GET", req.reference == "latest"
]]
local REQUEST_KEYS = set_of { "method", "kind", "repository", "reference", "ns", "host", "client", "headers",
    "ctx", "credentials", "target" }

-- req.target on first read, as the server builds it (policy.c build_target).
local REQUEST_MT = {
    __index = function(req, key)
        if key ~= "target" then
            return nil
        end
        local target = false
        if type(rawget(req, "repository")) == "string" then
            local ok, mapped = pcall(function() return require("regfacade.mirror").resolve(req) end)
            if ok and type(mapped) == "table" then
                target = { upstream = mapped.upstream, repository = mapped.repository }
            end
        end
        rawset(req, "target", target)
        return target
    end,
}

function testing.request(opts)
    opts = check_options("request", opts, REQUEST_KEYS)
    local headers = {}
    for k, v in pairs(opts.headers or {}) do
        headers[type(k) == "string" and k:lower() or k] = v
    end
    -- What the server leaves out for each kind: the ping and the catalog
    -- itself name no repository, and a tag list, a ping and the catalog no
    -- reference (a spec then sees nil where the server gives nil).
    local kind = opts.kind or "manifest"
    local repository, reference = opts.repository, opts.reference
    if repository == nil and kind ~= "ping" and kind ~= "catalog" then
        repository = "library/alpine"
    end
    if reference == nil and (kind == "manifest" or kind == "blob" or kind == "referrers") then
        reference = "latest"
    end
    return setmetatable({
        method = opts.method or "GET",
        kind = kind,
        repository = repository,
        reference = reference,
        ns = opts.ns,
        host = opts.host,
        client = copy(opts.client),
        headers = headers,
        ctx = copy(opts.ctx),
        credentials = opts.credentials,
        target = opts.target,
    }, REQUEST_MT)
end

--[[
testing.layer(name) or testing.layer{ name =, media_type =, digest =, size =,
                                      diff_id =, urls =, annotations =,
                                      created_by =, comment =, source =,
                                      config = }

A layer descriptor, the stack entry regfacade.core takes. What is not given
is made up from name (default "layer"): digest = sha256 of "blob of NAME",
diff_id = sha256 of "tar of NAME", size = 1000 + #NAME, media_type OCI
tar+gzip. source ("file", "image", "blob") and config (the config table of
the image the layer comes from) are what the rewrite hook sees in
img.layers[i].source and img.layers[i].config (testing.run fills in source
and name from the decision's entry when the descriptor has none).
Example:
  local sup = testing.layer("supervisor")
  --> sup.digest == testing.core.digest("blob of supervisor")
]]
local LAYER_KEYS = set_of { "name", "media_type", "digest", "size", "diff_id", "urls", "annotations",
    "created_by", "comment", "source", "config" }

function testing.layer(opts)
    if type(opts) == "string" then
        opts = { name = opts }
    end
    opts = check_options("layer", opts, LAYER_KEYS)
    local name = opts.name or "layer"
    return {
        media_type = opts.media_type or OCI_GZIP,
        digest = opts.digest or core.digest("blob of " .. name),
        size = opts.size or 1000 + #name,
        diff_id = opts.diff_id or core.digest("tar of " .. name),
        urls = opts.urls,
        annotations = opts.annotations,
        created_by = opts.created_by,
        comment = opts.comment,
        source = opts.source,
        config = opts.config,
    }
end

local IMAGE_KEYS = set_of { "layers", "history", "empty_layers", "env", "extra_config_fields", "created",
    "architecture", "os", "annotations", "labels" }

-- The parts both image builders share: layers, history, diff_ids.
local function image_parts(fn, opts, layer_type)
    local layers = opts.layers
    if layers == nil then
        layers = 1
    end
    local list = {}
    if type(layers) == "number" then
        for i = 1, layers do
            list[i] = testing.layer { name = fn .. " base layer " .. i, media_type = layer_type }
        end
    elseif type(layers) == "table" then
        for i, l in ipairs(layers) do
            list[i] = l
        end
    else
        error(string.format("testing.%s: layers must be a count or a list of layers, got %s", fn, type(layers)), 3)
    end
    local created = opts.created or "2024-01-01T00:00:00Z"
    local diff_ids = json.array()
    for i, l in ipairs(list) do
        diff_ids[i] = l.diff_id
    end
    local history = nil
    if opts.history ~= false then
        history = json.array()
        local function add_empties()
            for k = 1, opts.empty_layers or 0 do
                history[#history + 1] = json.object({
                    created = created,
                    created_by = "/bin/sh -c #(nop)  ENV STEP=" .. k,
                    empty_layer = true,
                }, { "created", "created_by", "empty_layer" })
            end
        end
        if #list == 0 then
            add_empties()
        end
        for i, l in ipairs(list) do
            history[#history + 1] = json.object({
                created = created,
                created_by = l.created_by or ("/bin/sh -c #(nop) ADD file:" .. l.diff_id:sub(8, 19) .. " in / "),
            }, { "created", "created_by" })
            if i == 1 then -- the empty_layer entries (ENV, CMD...) go after the first layer's
                add_empties()
            end
        end
    end
    local env = json.array()
    for i, e in ipairs(opts.env or { "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" }) do
        env[i] = e
    end
    return list, created, diff_ids, history, env
end

-- extra_config_fields go last, in bytewise key order.
local function add_extra(cfg, order, extra)
    local keys = {}
    for k in pairs(extra or {}) do
        keys[#keys + 1] = k
    end
    table.sort(keys)
    for _, k in ipairs(keys) do
        cfg[k] = extra[k]
        order[#order + 1] = k
    end
end

local function finish_image(manifest, config, list)
    local config_text = json.encode(config)
    manifest.config.digest = core.digest(config_text)
    manifest.config.size = #config_text
    local manifest_text = json.encode(manifest)
    return {
        manifest_text = manifest_text,
        config_text = config_text,
        manifest = json.decode(manifest_text),
        config = json.decode(config_text),
        layers = list,
        digest = core.digest(manifest_text),
    }
end

--[[
testing.oci_image{ layers = N or { testing.layer{...}, ... }, history = true,
                   empty_layers = K, env = { "K=V", ... },
                   extra_config_fields = { name = value, ... },
                   created =, architecture =, os =, annotations =, labels = }

A fake upstream OCI image: { manifest_text =, config_text =, manifest =,
config = (both decoded), layers = { descriptors }, digest = }. Defaults: one
layer, history on (one entry per layer, then K empty_layer entries after the
first layer's), env PATH only, created 2024-01-01T00:00:00Z, amd64/linux.
history = false leaves "history" out. extra_config_fields are added last (in
bytewise key order) so a spec can check they survive.
Example:
  local img = testing.oci_image{ layers = 3, empty_layers = 2 }
  --> #img.manifest.layers == 3, #img.config.history == 5
]]
function testing.oci_image(opts)
    opts = check_options("oci_image", opts, IMAGE_KEYS)
    local list, created, diff_ids, history, env = image_parts("oci_image", opts, OCI_GZIP)
    local labels = opts.labels and json.object(copy(opts.labels)) or nil
    local order = { "created", "architecture", "os", "config", "rootfs", "history" }
    local config = {
        created = created,
        architecture = opts.architecture or "amd64",
        os = opts.os or "linux",
        config = json.object({ Env = env, Cmd = json.array { "/bin/sh" }, WorkingDir = "/", Labels = labels },
            { "Env", "Cmd", "WorkingDir", "Labels" }),
        rootfs = json.object({ type = "layers", diff_ids = diff_ids }, { "type", "diff_ids" }),
        history = history,
    }
    add_extra(config, order, opts.extra_config_fields)
    json.object(config, order)
    local layers = json.array()
    for i, l in ipairs(list) do
        layers[i] = json.object({ mediaType = l.media_type, digest = l.digest, size = l.size },
            { "mediaType", "digest", "size" })
    end
    local manifest = json.object({
        schemaVersion = 2,
        mediaType = OCI_MANIFEST,
        config = json.object({ mediaType = OCI_CONFIG, digest = "", size = 0 }, { "mediaType", "digest", "size" }),
        layers = layers,
        annotations = opts.annotations and json.object(copy(opts.annotations)) or nil,
    }, { "schemaVersion", "mediaType", "config", "layers", "annotations" })
    return finish_image(manifest, config, list)
end

--[[
testing.docker_image{...}

The same options as testing.oci_image, for a Docker schema2 image: Docker
media types, descriptors in Docker's key order (mediaType, size, digest), and
a config with Docker's extra fields (container, container_config,
docker_version, Labels null unless labels are given).
Example:
  local img = testing.docker_image{ layers = 2 }
  --> img.manifest.mediaType == "application/vnd.docker.distribution.manifest.v2+json"
]]
function testing.docker_image(opts)
    opts = check_options("docker_image", opts, IMAGE_KEYS)
    local list, created, diff_ids, history, env = image_parts("docker_image", opts, DOCKER_GZIP)
    local function container_config(cmd)
        return json.object({
            Hostname = "", Domainname = "", User = "", AttachStdin = false, AttachStdout = false,
            AttachStderr = false, Tty = false, OpenStdin = false, StdinOnce = false, Env = env, Cmd = cmd,
            Image = "", Volumes = json.null, WorkingDir = "", Entrypoint = json.null, OnBuild = json.null,
            Labels = opts.labels and json.object(copy(opts.labels)) or json.null,
        }, { "Hostname", "Domainname", "User", "AttachStdin", "AttachStdout", "AttachStderr", "Tty", "OpenStdin",
            "StdinOnce", "Env", "Cmd", "Image", "Volumes", "WorkingDir", "Entrypoint", "OnBuild", "Labels" })
    end
    local order = { "architecture", "config", "container", "container_config", "created", "docker_version",
        "history", "os", "rootfs" }
    local config = {
        architecture = opts.architecture or "amd64",
        config = container_config(json.array { "/bin/sh" }),
        container = core.digest("container of " .. created):sub(8),
        container_config = container_config(json.array { "/bin/sh", "-c", "#(nop) ", 'CMD ["/bin/sh"]' }),
        created = created,
        docker_version = "20.10.23",
        history = history,
        os = opts.os or "linux",
        rootfs = json.object({ type = "layers", diff_ids = diff_ids }, { "type", "diff_ids" }),
    }
    add_extra(config, order, opts.extra_config_fields)
    json.object(config, order)
    local layers = json.array()
    for i, l in ipairs(list) do
        layers[i] = json.object({ mediaType = l.media_type, size = l.size, digest = l.digest },
            { "mediaType", "size", "digest" })
    end
    local manifest = json.object({
        schemaVersion = 2,
        mediaType = DOCKER_MANIFEST,
        config = json.object({ mediaType = DOCKER_CONFIG, size = 0, digest = "" }, { "mediaType", "size", "digest" }),
        layers = layers,
    }, { "schemaVersion", "mediaType", "config", "layers" })
    return finish_image(manifest, config, list)
end

-- Stack entries for one entry of a decision's layers (see testing.run).
local function expand(entry, i, layers, out)
    local function from_table(name, what, skip)
        local v = layers and layers[name]
        if v == nil and layers and what == "file" and name:sub(1, 1) == "/" then
            -- the server made the path absolute: the key it was given as
            for k, lv in pairs(layers) do
                if type(k) == "string" and name:sub(-#k - 1) == "/" .. k then
                    v = lv
                end
            end
        end
        if v == nil then
            error(string.format("testing.run: layers[%d] names %s %q, which is not in the layers table given to run",
                i, what, tostring(name)), 4)
        end
        if v.digest ~= nil or v.blob ~= nil then
            v = { v }
        end
        for k = (skip or 0) + 1, #v do
            local before = #out
            expand(v[k], i, nil, out)
            -- What img.layers[i] says of the layer's origin, as the server
            -- gives it: the config name or the inline file path or image ref.
            for j = before + 1, #out do
                if type(out[j]) == "table" then
                    local d = copy(out[j])
                    if what == "layer" then -- a config name wins, as in the server
                        d.name = name
                    else
                        d.name = d.name or name
                    end
                    d.source = d.source or (what ~= "layer" and what or nil)
                    if type(entry) == "table" then -- the entry's history text wins, as in the server
                        d.created_by = entry.created_by or d.created_by
                        d.comment = entry.comment or d.comment
                    end
                    out[j] = d
                end
            end
        end
    end
    if entry == "base" then
        out[#out + 1] = "base"
    elseif type(entry) == "string" then
        from_table(entry, "layer", nil)
    elseif type(entry) ~= "table" then
        error(string.format("testing.run: layers[%d] is a %s, expected \"base\", a name or a table", i,
            type(entry)), 3)
    elseif entry.file ~= nil then
        from_table(entry.file, "file", nil)
    elseif entry.image ~= nil then
        from_table(entry.image, "image", entry.skip)
    elseif entry.blob ~= nil then
        local d = copy(entry)
        d.digest, d.blob = entry.blob, nil
        d.upstream, d.repository = nil, nil -- where the server fetches it from
        d.source = d.source or "blob"
        d.name = d.name or entry.blob
        out[#out + 1] = d
    else
        out[#out + 1] = entry
    end
end

-- A resolution's layers (the server's reading, regfacade.policy) as the
-- decision entries expand takes.
local function entries_of(resolution)
    local out = {}
    for i, l in ipairs(resolution.layers or { { kind = "base" } }) do
        if l.kind == "base" then
            out[i] = "base"
        elseif l.kind == "named" then
            out[i] = l.name
        elseif l.kind == "file" then
            out[i] = { file = l.file, created_by = l.created_by, comment = l.comment }
        elseif l.kind == "image" then
            out[i] = { image = l.image, skip = (l.skip or 0) > 0 and l.skip or nil, created_by = l.created_by,
                       comment = l.comment }
        else
            out[i] = { blob = l.digest, size = l.size, media_type = l.media_type, diff_id = l.diff_id, urls = l.urls,
                       created_by = l.created_by, comment = l.comment }
        end
    end
    return out
end

--[[
testing.decision(resolution)

A resolution from p:resolve (the server's reading of resolve's answer) in
the shape a policy writes it: { upstream =, repository =, reference =,
credentials =, layers = { "base", "NAME", { file = }, { image =, skip = },
{ blob =, ... } }, platforms = } (layers only when resolve gave some).
Example:
  local d = testing.decision(p:resolve(testing.request { repository = "acme/app" }))
  --> d.layers == { "base", "tools" }
]]
function testing.decision(r)
    if type(r) ~= "table" or r.allowed == false then
        return r
    end
    return {
        upstream = r.upstream,
        repository = r.repository,
        reference = r.reference ~= "" and r.reference or nil,
        credentials = r.credentials,
        layers = r.layers and entries_of(r) or nil,
        platforms = r.platforms,
    }
end

local policy_mod_ok, policy_mod = pcall(require, "regfacade.policy")
local Policy = {}
Policy.__index = Policy

-- A failure (not a refusal) is the spec's failure: the server would answer
-- 500 for it. Raised with what the server logs.
local function answer(hook, a)
    if type(a) == "table" and a.failed then
        error(string.format("testing.policy: %s: the server answers %d %s: %s", hook, a.status, a.code, a.message), 3)
    end
    return a
end

--[[
testing.policy(path [, { config =, options = }])

The one way to load a policy in a spec: the server's own code
(regfacade.policy, build/lua/regfacade/policy.so) loads the config, compiles
the policy in the real sandbox (budgets, phase checks, self_check) and reads
every hook's answer with the readers and validation the server uses.
  config   a config file's path (relative paths in it resolve against its
           folder) or a config table as the JSON file holds it (relative
           paths resolve against the policy's folder); without one, one
           upstream "hub" (Docker Hub) as default_upstream. cache.dir
           need not be given.
  options  policy.options (replaces the config's)
Methods (req: testing.request{...}; like the server, they carry req.ctx
and authorize's credential set in req from one hook to the next):
  p:authorize(req)  { allowed = true [, credentials =] } or
                    { allowed = false, status =, code =, message =
                      [, challenge =, retry_after =] }
  p:spec(req)       { provider =, id = }, false, or a refusal
  p:resolve(req)    { upstream =, repository =, reference =, credentials =,
                      layers = { { kind = "base"|"named"|"file"|"image"|
                      "blob", ... } }, platforms =, fingerprint = } or a
                    refusal
  p:run(req, base [, layers])  resolve, then the assembly and rewrite
                    generate_image runs (the same digests as serve; an
                    image left as it was keeps base's bytes): what
                    testing.run returns
  p:log(req [, res])
  p:close()         frees it; policies alive at once share regfacade.shared
                    as the server's generations do (close each in after_each
                    for a fresh one per test)
An answer the server gives as a policy failure (a Lua error, a budget, a
malformed answer, an upstream or credential set the config lacks) raises
"testing.policy: HOOK: the server answers 500 ...": a spec that passes
cannot be a 500 in the server.
Example:
  local p = testing.policy("examples/auth/policy.lua", { config = "examples/auth/config.json" })
  local a = p:authorize(testing.request { client = { user = "alice", password = "alice-password" } })
  --> a.allowed == true
]]
local POLICY_KEYS = set_of { "config", "options" }

function testing.policy(path, opts)
    if type(path) ~= "string" then
        error("testing.policy: path must be a string, got " .. type(path), 2)
    end
    opts = check_options("policy", opts, POLICY_KEYS)
    if not policy_mod_ok then
        error("testing.policy: regfacade.policy is not built (make lua-policy): " .. tostring(policy_mod), 2)
    end
    local ok, p = pcall(policy_mod.new, { file = path, config = opts.config, options = opts.options })
    if not ok then
        error(p, 2)
    end
    return setmetatable({ c = p, path = path }, Policy)
end

function Policy:authorize(req)
    return answer("authorize", self.c:authorize(req or testing.request()))
end

function Policy:spec(req)
    return answer("spec", self.c:spec(req or testing.request()))
end

function Policy:resolve(req)
    return answer("resolve", self.c:resolve(req or testing.request()))
end

function Policy:log(req, res)
    res = check_options("log", res, set_of { "status", "bytes", "completed", "duration", "upstream" })
    return self.c:log(req or testing.request(), res)
end

function Policy:close()
    self.c:close()
end

function Policy:run(req, base, layers)
    req = req or testing.request()
    if type(base) ~= "table" or type(base.manifest_text) ~= "string" or type(base.config_text) ~= "string" then
        error("testing.run: base must be an image from testing.oci_image or testing.docker_image", 2)
    end
    local decision = self:resolve(req)
    if decision.allowed == false then
        return nil, decision
    end
    local stack = {}
    for i, entry in ipairs(entries_of(decision)) do
        expand(entry, i, layers, stack)
    end
    -- rewrite sees where resolve sent the request, as in the server
    rawset(req, "target", { upstream = decision.upstream, repository = decision.repository })
    local out = answer("rewrite", self.c:assemble(req, base.manifest_text, base.config_text, stack))
    if out.allowed == false then
        return nil, out
    end
    return {
        manifest = json.decode(out.manifest_text),
        config = json.decode(out.config_text),
        manifest_text = out.manifest_text,
        config_text = out.config_text,
        manifest_digest = out.manifest_digest,
        config_digest = out.config_digest,
        unchanged = out.unchanged,
        decision = decision,
        stack = stack,
    }
end

local function is_policy(v)
    return getmetatable(v) == Policy
end

--[[
testing.run(policy, req, base [, layers])

Runs a policy as the server does: policy.resolve(req) decides the layer
stack, regfacade.core assembles it on base's manifest and config, and
policy.rewrite(img, req) edits the result, all through the server's C code.
Arguments:
  policy  the table a policy module returns (resolve and rewrite optional)
  req     a request (testing.request{...}; nil means testing.request())
  base    an image from testing.oci_image / testing.docker_image, or any
          { manifest_text =, config_text = }
  layers  optional map from names to descriptors (testing.layer) or lists of
          them. An entry of the decision's `layers` may be
            "base"                        the base image's layers
            "name"                        layers[name]
            { file = F }                  layers[F]
            { image = I, skip = N }       layers[I], its first N dropped
            { blob = D, size =, media_type =, diff_id =, urls = }
                                          that descriptor
            a descriptor as testing.layer makes
Returns:
  { manifest =, config = (decoded), manifest_text =, config_text =,
    manifest_digest =, config_digest =, decision = (resolve's table),
    stack = (what was assembled) }
  or nil, refusal when resolve returns nil (and its second value), or when
  resolve or rewrite returns regfacade.deny(...) (refusal: its fields,
  { deny = true, status =, code =, message =, retry_after =, challenge = }).
Errors from the policy or the assembly are raised ("regfacade.core: ...").
Example:
  local out = testing.run({ resolve = function(req) return { layers = { "base", "tools" } } end },
                          nil, testing.oci_image{}, { tools = testing.layer("tools") })
  --> #out.manifest.layers == 2
]]
function testing.run(policy, req, base, layers)
    if is_policy(policy) then
        return policy:run(req, base, layers)
    end
    if type(policy) ~= "table" then
        error("testing.run: policy must be a table of hooks, got " .. type(policy), 2)
    end
    req = req or testing.request()
    if type(base) ~= "table" or type(base.manifest_text) ~= "string" or type(base.config_text) ~= "string" then
        error("testing.run: base must be an image from testing.oci_image or testing.docker_image", 2)
    end
    local decision = {}
    if policy.resolve ~= nil then
        local d, refusal = policy.resolve(req)
        if is_deny(d) then
            return nil, sandbox_mod.refusal(d)
        end
        if d == nil then
            return nil, refusal
        end
        if type(d) ~= "table" then
            error("testing.run: resolve returned a " .. type(d) .. ", expected a table or nil", 2)
        end
        decision = d
    end
    local entries = decision.layers
    if entries == nil then
        entries = { "base" }
    end
    local stack = {}
    for i, entry in ipairs(entries) do
        expand(entry, i, layers, stack)
    end
    local mt, ct, md, cd = core.assemble_rewrite(base.manifest_text, base.config_text, stack, policy.rewrite, req)
    if mt == nil then
        return nil, ct -- the rewrite hook refused: regfacade.deny's fields
    end
    return {
        manifest = json.decode(mt),
        config = json.decode(ct),
        manifest_text = mt,
        config_text = ct,
        manifest_digest = md,
        config_digest = cd,
        decision = decision,
        stack = stack,
    }
end

--[[
testing.host{ config =, options =, phase =, data_files =, data_dir = }

For specs of library modules (regfacade.mirror, regfacade.rules, ...)
called directly, not of policies: a policy is loaded with testing.policy,
where its hooks run in the server's sandbox with its phase checks (this
stand-in has no phases, so it offers nothing a phase guards:
crypt_verify is left out). Puts a stand-in for `require "regfacade"` into
package.loaded (and "regfacade.shared", "regfacade.json") and returns it.
What it holds:
  config        { upstreams =, default_upstream =, options = } (defaults:
                one upstream "hub" = Docker Hub, default_upstream "hub",
                options from `options`)
  log(level, message)  recorded in host.logs as { level =, message = }
  deny(status, code, message [, opts])  the server's regfacade.deny (C)
  digest(s)     sha256, the server's C code (regfacade.core)
  json, null    regfacade.json
  shared        the server's C dictionary (regfacade.sandbox.shared), fresh
                for each host
  read_file(path)  reads path when it is one of data_files or under
                data_dir (as the server's rule), else raises
  phase()       host.phase (default "resolve"; set it to test phase checks)
Call testing.reset() (or testing.host again) in before_each: modules are
loaded fresh.
Example:
  local host = testing.host{ options = { allow = { "acme/" } } }
  local mirror = require "regfacade.mirror"   -- a library module, called directly
  --> host.logs == {} and require("regfacade") == host
]]
local HOST_KEYS = set_of { "config", "options", "phase", "data_files", "data_dir" }


local function real_path(p)
    local f = io.popen("realpath -m -- '" .. p:gsub("'", "'\\''") .. "' 2>/dev/null")
    local r = f and f:read("l")
    if f then f:close() end
    return r or p
end

-- The layer digests of a manifest (a decoded table), in order: what an
-- assertion on a policy's layer order compares.
function testing.layer_digests(manifest)
    local out = {}
    for i, l in ipairs(manifest.layers) do
        out[i] = l.digest
    end
    return out
end

-- The value of environment variable `name` in an image config (a decoded
-- table), or nil when it is not set.
function testing.env_value(config, name)
    for _, e in ipairs((config.config or {}).Env or {}) do
        local eq = e:find("=", 1, true)
        if eq and e:sub(1, eq - 1) == name then
            return e:sub(eq + 1)
        end
    end
end

function testing.host(opts)
    opts = check_options("host", opts, HOST_KEYS)
    testing.reset()
    local config = opts.config or {
        upstreams = { hub = { url = "https://registry-1.docker.io", host = "registry-1.docker.io:443",
                              library_prefix = true, credentials = {} } },
        default_upstream = "hub",
    }
    config.options = config.options or opts.options or {}
    local host = { config = config, logs = {}, phase_name = opts.phase or "resolve", json = json, null = json.null,
                   version = "test" }
    function host.log(level, message)
        host.logs[#host.logs + 1] = { level = level, message = message }
    end
    host.digest = core.digest
    host.phase = function() return host.phase_name end
    if sandbox_ok then
        host.shared = sandbox_mod.shared()
        host.deny = sandbox_mod.deny
    end
    local allowed = {}
    for _, f in ipairs(opts.data_files or {}) do
        allowed[real_path(f)] = true
    end
    local dir = opts.data_dir and real_path(opts.data_dir)
    function host.read_file(path)
        local rp = real_path(path)
        if not allowed[rp] and not (dir and rp:sub(1, #dir + 1) == dir .. "/") then
            error(path .. ": not a data file this policy may read (config policy.data_files, policy.data_dir)", 2)
        end
        local f = assert(io.open(rp, "rb"))
        local s = f:read("a")
        f:close()
        return s
    end
    package.loaded["regfacade"] = host
    package.loaded["regfacade.shared"] = host.shared
    package.loaded["regfacade.json"] = json
    return host
end

--[[
testing.reset()

Forgets the stand-in host and the policy modules loaded by specs (every
"regfacade.*" module but testing, core, sandbox and policy), so
the next require loads them fresh.
]]
function testing.reset()
    for name in pairs(package.loaded) do
        if (name == "regfacade" or name:match("^regfacade%.")) and name ~= "regfacade.testing"
            and name ~= "regfacade.core" and name ~= "regfacade.sandbox" and name ~= "regfacade.policy" then
            package.loaded[name] = nil
        end
    end
end

--[[
testing.authorize(policy, req)

policy:authorize(req) for a policy from testing.policy (the server's own
reader of the answer). A table of hooks is refused: load the policy file
with testing.policy, as the server runs it.
]]
function testing.authorize(policy, req)
    if not is_policy(policy) then
        error("testing.authorize: give a policy from testing.policy(path, { config =, options = }) "
            .. "(the server's own code reads the answer)", 2)
    end
    return policy:authorize(req)
end

--[[
testing.log(policy, req [, res])

Runs policy.log(req, res) as the server does after a response: req without
client.password and client.token, res = { status = 200, bytes = 0,
completed = true, duration = 0, upstream = nil } overlaid with res. Returns
what the hook returned (the server ignores it); errors are raised here (the
server only logs them).
Example:
  testing.log(policy, testing.request{}, { status = 404 })
]]
local RES_KEYS = set_of { "status", "bytes", "completed", "duration", "upstream" }

function testing.log(policy, req, res)
    if is_policy(policy) then
        return policy:log(req, res)
    end
    res = check_options("log", res, RES_KEYS)
    if type(policy) ~= "table" or type(policy.log) ~= "function" then
        error("testing.log: the policy has no log hook", 2)
    end
    req = req or testing.request()
    local r = copy(req)
    r.client = copy(req.client)
    r.client.password, r.client.token = nil, nil
    local full = { status = 200, bytes = 0, completed = true, duration = 0 }
    for k, v in pairs(res) do
        full[k] = v
    end
    return policy.log(r, full)
end

--[[
testing.sandbox{ file = PATH or source = TEXT, config =, memory_bytes =,
                 hook_instructions =, hook_time_ms =, data_files =, data_dir = }

The server's own sandbox (regfacade.sandbox, build/lua/regfacade/sandbox.so):
the policy runs in a separate locked-down Lua state with the real limits.
sb:call(hook, args...) returns true, results... or false, outcome
("error", "time", "instructions", "memory"), message. Arguments and results
are copied as JSON data.
Example:
  local sb = testing.sandbox{ source = "return { resolve = function(req) while true do end end }" }
  local ok, outcome = sb:call("resolve", testing.request())
  --> ok == false and outcome == "instructions"
]]
function testing.sandbox(opts)
    if not sandbox_ok then
        error("testing.sandbox: regfacade.sandbox is not built (make lua-sandbox): " .. tostring(sandbox_mod), 2)
    end
    return sandbox_mod.new(opts)
end

return testing
