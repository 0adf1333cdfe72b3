--[[
regfacade.specs: turning an image spec into a resolve answer and a rewrite.

An image spec is data an orchestrator gives regfacade about one image
(docs/specs.md). The core fetches and checks it; a policy's spec(req) hook
says which names have one, and the core hands it to resolve(req, spec) and
to rewrite as req.spec, as plain tables (regfacade.json's shape: JSON null
is regfacade.null). These helpers do the usual mapping; they do no I/O.

  local specs = require "regfacade.specs"
  return {
    spec = function(req)
      local id = specs.id_from(req.repository, "remote/")
      return id and { provider = "workspaces", id = id } or nil
    end,
    resolve = function(req, spec) return specs.resolve(req, spec) end,
    rewrite = function(img, req) if req.spec then specs.rewrite(img, req.spec) end end,
  }

Provided:
  specs.SCRATCH            the empty base's manifest digest per platform
  specs.id_from(repository, prefix)  the id in a name under prefix, or nil
  specs.split_ref(ref)     "UPSTREAM/repo:tag" -> upstream, repository, reference
  specs.resolve(req, spec [, opts])  the resolve answer for a spec
  specs.rewrite(img, spec [, opts])  env, labels and annotations of a spec
]]

local image = require "regfacade.image"

local specs = {}

--[[
specs.SCRATCH: { ["linux/amd64"] = "sha256:...", ["linux/arm64"] = "sha256:..." }

The manifest digests of the empty base an image without base is built on:
an OCI manifest with no layers whose config holds only os, architecture,
"created": "1970-01-01T00:00:00Z", an empty rootfs and an empty history
(no Env, no Cmd, no WorkingDir). The core keeps these images in its store;
their bytes never change, so neither do these digests
(spec/unit/specs_spec.lua rebuilds them).
]]
specs.SCRATCH = {
    ["linux/amd64"] = "sha256:584a3e8bfbef76e0cd02576a494bcf71d3810fc9c43f8853b9379c2946d4bb3b",
    ["linux/arm64"] = "sha256:94cc4d9d26e6f72f78cdb5c47e85d88f0b368ef687d161749dbdb98465b5d076",
}

-- The repository named for the empty base (it is never asked upstream: the
-- core answers it from its store).
specs.SCRATCH_REPOSITORY = "regfacade/scratch"

-- Whether v stands for JSON null (or is absent).
local function is_null(v)
    if v == nil or type(v) == "userdata" then
        return true
    end
    local ok, core = pcall(require, "regfacade")
    return ok and type(core) == "table" and core.null ~= nil and rawequal(v, core.null)
end

-- The keys of an object table in document order (regfacade.json keeps it
-- in the metatable's __jsonorder), then any others sorted: the same spec
-- text gives the same order, so the same image.
local function ordered_keys(t)
    local keys, seen = {}, {}
    local mt = getmetatable(t)
    local order = type(mt) == "table" and rawget(mt, "__jsonorder") or nil
    if type(order) == "table" then
        for _, k in ipairs(order) do
            if rawget(t, k) ~= nil and not seen[k] then
                keys[#keys + 1] = k
                seen[k] = true
            end
        end
    end
    local rest = {}
    for k in pairs(t) do
        if type(k) == "string" and not seen[k] then
            rest[#rest + 1] = k
        end
    end
    table.sort(rest)
    for _, k in ipairs(rest) do
        keys[#keys + 1] = k
    end
    return keys
end

--[[
specs.id_from(repository, prefix) -> id or nil

The part of repository after prefix ("remote/ws-123" with "remote/" gives
"ws-123"), or nil when repository does not start with prefix or nothing
follows it. The id is not checked here: the core refuses ids that are not
[A-Za-z0-9][A-Za-z0-9._-]{0,127} with a 404.
Hooks: any.
Example:
  specs.id_from("remote/ws-123", "remote/") --> "ws-123"
  specs.id_from("library/alpine", "remote/") --> nil
]]
function specs.id_from(repository, prefix)
    if type(repository) ~= "string" or type(prefix) ~= "string" then
        error("specs.id_from: repository and prefix must be strings", 2)
    end
    if #repository <= #prefix or repository:sub(1, #prefix) ~= prefix then
        return nil
    end
    return repository:sub(#prefix + 1)
end

--[[
specs.split_ref(ref) -> upstream, repository, reference

Splits "UPSTREAM/repository:tag" or "UPSTREAM/repository@sha256:HEX"
(the form of a spec's base and image layers); a missing tag is "latest".
Raises an error for anything else.
Hooks: any.
Example:
  specs.split_ref("local/acme/app:1.0") --> "local", "acme/app", "1.0"
]]
function specs.split_ref(ref)
    if type(ref) ~= "string" then
        error("specs.split_ref: ref must be a string, got " .. type(ref), 2)
    end
    local upstream, rest = ref:match("^([^/]+)/(.+)$")
    if not upstream then
        error(string.format("specs.split_ref: %q is not UPSTREAM/repository[:tag|@digest]", ref), 2)
    end
    local repo, digest = rest:match("^(.-)@(sha256:%x+)$")
    if repo then
        return upstream, repo, digest
    end
    local r, tag = rest:match("^(.*):([%w_][%w_.-]*)$")
    if r and not r:find(":", 1, true) then
        return upstream, r, tag
    end
    return upstream, rest, "latest"
end

-- A plain copy of a JSON value (drops regfacade.json's metatables).
local function copy(v)
    if type(v) ~= "table" then
        return v
    end
    local c = {}
    for k, x in pairs(v) do
        c[k] = copy(x)
    end
    return c
end

-- The upstream to name for an image without base: opts.upstream, else the
-- config's default_upstream, else the first upstream by name.
local function any_upstream(opts)
    if opts.upstream then
        return opts.upstream
    end
    local ok, core = pcall(require, "regfacade")
    local cfg = ok and type(core) == "table" and core.config or nil
    if cfg and cfg.default_upstream then
        return cfg.default_upstream
    end
    local names = {}
    for name in pairs(cfg and cfg.upstreams or {}) do
        names[#names + 1] = name
    end
    table.sort(names)
    if names[1] == nil then
        error("specs.resolve: an image without base needs an upstream name (opts.upstream): none is configured", 3)
    end
    return names[1]
end

local RESOLVE_OPTIONS = { upstream = true }

--[[
specs.resolve(req, spec [, opts]) -> resolve answer

The resolve answer for a spec:
  - base "UPSTREAM/repo:tag": upstream, repository and reference from it;
    the layers are the spec's layers, with "base" first unless the spec
    places "base" itself;
  - base null (or absent): the empty base (specs.SCRATCH for spec.platform,
    default "linux/amd64"), under opts.upstream or the config's
    default_upstream (or the first upstream by name); the layers are the
    spec's layers alone.
A request by digest keeps its digest as the reference: it names bytes
regfacade generated before (the digest a tag request answered). The
request's tag is otherwise ignored (one spec, one image).
Hooks: resolve.
Arguments:
  req   the request
  spec  the spec table (resolve's second argument)
  opts  optional { upstream = NAME } for images without base; an unknown
        key is an error
Example:
  specs.resolve(req, { base = "local/acme/app:1.0", layers = { "supervisor" } })
  --> { upstream = "local", repository = "acme/app", reference = "1.0",
        layers = { "base", "supervisor" } }
]]
function specs.resolve(req, spec, opts)
    if type(req) ~= "table" or type(spec) ~= "table" then
        error("specs.resolve: req and spec must be tables", 2)
    end
    opts = opts or {}
    for k in pairs(opts) do
        if not RESOLVE_OPTIONS[k] then
            error(string.format("specs.resolve: unknown option %q (known: upstream)", tostring(k)), 2)
        end
    end
    local layers, has_base_entry = {}, false
    for _, l in ipairs(is_null(spec.layers) and {} or spec.layers) do
        if l == "base" then
            has_base_entry = true
        end
    end
    local answer
    if not is_null(spec.base) then
        local upstream, repository, reference = specs.split_ref(spec.base)
        answer = { upstream = upstream, repository = repository, reference = reference }
        if not has_base_entry then
            layers[1] = "base"
        end
    else
        local platform = is_null(spec.platform) and "linux/amd64" or spec.platform
        local digest = specs.SCRATCH[platform]
        if not digest then
            error(string.format("specs.resolve: no empty base for platform %q", tostring(platform)), 2)
        end
        answer = { upstream = any_upstream(opts), repository = specs.SCRATCH_REPOSITORY, reference = digest }
    end
    for _, l in ipairs(is_null(spec.layers) and {} or spec.layers) do
        if l ~= "base" or not is_null(spec.base) then
            layers[#layers + 1] = copy(l)
        end
    end
    answer.layers = layers
    if type(req.reference) == "string" and req.reference:match("^sha256:%x+$") and req.kind == "manifest" then
        answer.reference = req.reference
    end
    return answer
end

local REWRITE_OPTIONS = { env_modifiers = true, prefix = true }

--[[
specs.rewrite(img, spec [, opts]) -> nothing

Applies a spec to an assembled image, in this order:
  1. the env modifiers each added image carries in its own config
     (image.apply_env_modifiers, once per image, in stack order), unless
     opts.env_modifiers is false; opts.prefix is their prefix (default
     "GITPOD_ENV_");
  2. spec.env, in the spec's key order: "value" sets, null unsets,
     { prepend = s } puts s before the old value, { append = s } after it;
  3. spec.labels (config.Labels) and spec.annotations (manifest
     annotations): "value" sets, null removes.
Hooks: rewrite.
Arguments:
  img   the rewrite hook's img
  spec  the spec table (req.spec)
  opts  optional { env_modifiers = true, prefix = "GITPOD_ENV_" }
Example:
  specs.rewrite(img, { env = { PATH = { prepend = "/ide/bin:" } } })
  --> PATH=/ide/bin:/usr/bin (it was /usr/bin)
]]
function specs.rewrite(img, spec, opts)
    if type(img) ~= "table" or type(spec) ~= "table" then
        error("specs.rewrite: img and spec must be tables", 2)
    end
    opts = opts or {}
    for k in pairs(opts) do
        if not REWRITE_OPTIONS[k] then
            error(string.format("specs.rewrite: unknown option %q (known: env_modifiers, prefix)", tostring(k)), 2)
        end
    end
    if opts.env_modifiers ~= false then
        local seen = {}
        for _, layer in ipairs(img.layers or {}) do
            if layer.source == "image" and layer.config and not seen[layer.name or layer.digest] then
                seen[layer.name or layer.digest] = true
                image.apply_env_modifiers(img.config, layer.config, opts.prefix and { prefix = opts.prefix } or nil)
            end
        end
    end
    local env = spec.env
    if not is_null(env) then
        for _, name in ipairs(ordered_keys(env)) do
            local v = env[name]
            if is_null(v) then
                image.env_unset(img.config, name)
            elseif type(v) == "string" then
                image.env_set(img.config, name, v)
            elseif type(v) == "table" and type(v.prepend) == "string" then
                image.env_prepend(img.config, name, v.prepend)
            elseif type(v) == "table" and type(v.append) == "string" then
                image.env_append(img.config, name, v.append)
            else
                error(string.format("specs.rewrite: env.%s must be a string, null, {prepend=} or {append=}", name), 2)
            end
        end
    end
    if not is_null(spec.labels) then
        for _, k in ipairs(ordered_keys(spec.labels)) do
            local v = spec.labels[k]
            if is_null(v) then
                image.label_remove(img.config, k)
            else
                image.label_set(img.config, k, v)
            end
        end
    end
    if not is_null(spec.annotations) then
        for _, k in ipairs(ordered_keys(spec.annotations)) do
            local v = spec.annotations[k]
            if is_null(v) then
                image.annotation_remove(img.manifest, k)
            else
                image.annotation_set(img.manifest, k, v)
            end
        end
    end
end

return specs
