--[[
regfacade.image: helpers a policy's rewrite hook uses on an image config and
a manifest, both as plain decoded JSON tables.

An image config is the OCI/Docker config JSON: its `config.Env` is an array
of "NAME=value" strings, its `config.Labels` a map of strings (either may be
missing). A manifest's `annotations` is a map of strings.

Provided:
  image.env_get, image.env_set, image.env_append, image.env_prepend,
  image.env_unset                   -- config.Env
  image.label_set, image.label_remove                -- config.Labels
  image.annotation_set, image.annotation_remove      -- manifest.annotations
  image.apply_env_modifiers         -- <PREFIX>SET_/APPEND_/PREPEND_ entries
                                    -- of an added image's env

Rules every helper follows:
  * Everything is done in place on the tables given; nothing else is touched,
    so every field a helper does not change is kept as it was.
  * A writer creates what is missing: `config`, `config.Env` (as an array),
    `config.Labels`, `annotations`. A JSON null (nil, a userdata sentinel
    such as cjson.null, or regfacade.null when the core provides one) counts
    as missing. Any other non-table value there is an error.
  * An env variable is an entry "NAME=value". Entries without "=" and
    entries that are not strings are left alone. When a name appears more
    than once, the last entry is its value (what runtimes do); a writer
    keeps the first entry's position and drops the later duplicates.
  * Arguments are checked; a bad one raises an error naming the function,
    e.g. "image.env_set: name must be a non-empty string without '='".
  * No I/O and no globals: the helpers are pure functions over their tables.

The names say what happens: env_append puts text after the old value,
env_prepend before it. (Gitpod's registry-facade has these two inverted;
regfacade does not.)
]]

local image = {}

local DEFAULT_ENV_PREFIX = "GITPOD_ENV_"

-- Whether v stands for a JSON null (or is absent).
local function is_null(v)
    if v == nil then
        return true
    end
    local t = type(v)
    if t == "userdata" then
        return true
    end
    if t ~= "table" then
        return false
    end
    -- A table may be the core's own null sentinel. require (not
    -- package.loaded) because a sandboxed policy state need not expose
    -- `package`; pcall because busted specs may run without a core stub.
    local ok, core = pcall(require, "regfacade")
    return ok and type(core) == "table" and core.null ~= nil and rawequal(v, core.null)
end

-- Argument checks. `level` 3 points the error at the helper's caller.
local function check_table(fn, what, v)
    if type(v) ~= "table" then
        error(string.format("image.%s: %s must be a table, got %s", fn, what, type(v)), 3)
    end
end

local function check_name(fn, name)
    if type(name) ~= "string" or name == "" or name:find("=", 1, true) then
        error(string.format("image.%s: name must be a non-empty string without '=', got %s",
            fn, type(name) == "string" and string.format("%q", name) or type(name)), 3)
    end
end

local function check_key(fn, what, key)
    if type(key) ~= "string" or key == "" then
        error(string.format("image.%s: %s must be a non-empty string, got %s",
            fn, what, type(key) == "string" and "an empty string" or type(key)), 3)
    end
end

local function check_string(fn, what, v)
    if type(v) ~= "string" then
        error(string.format("image.%s: %s must be a string, got %s", fn, what, type(v)), 3)
    end
end

-- t[key] as a table: created when missing (if create), nil when missing
-- (otherwise), an error when it holds something that is not a table.
local function field_table(fn, t, key, path, create)
    local v = t[key]
    if is_null(v) then
        if not create then
            return nil
        end
        v = {}
        t[key] = v
    elseif type(v) ~= "table" then
        error(string.format("image.%s: %s is a %s, expected %s", fn, path, type(v),
            key == "Env" and "an array" or "a table"), 3)
    end
    return v
end

-- cfg.config.Env, or nil when missing and not create.
local function env_of(fn, cfg, create)
    local c = field_table(fn, cfg, "config", "config", create)
    if c == nil then
        return nil
    end
    return field_table(fn, c, "Env", "config.Env", create)
end

-- The value part of an entry "NAME=value" when it is for name, else nil.
local function entry_value(entry, name)
    if type(entry) == "string" and entry:sub(1, #name + 1) == name .. "=" then
        return entry:sub(#name + 2)
    end
    return nil
end

-- Sets name=value in env: first entry's position, later duplicates dropped,
-- appended when absent.
local function set_entry(env, name, value)
    local entry = name .. "=" .. value
    local at = nil
    local i = 1
    while i <= #env do
        if entry_value(env[i], name) ~= nil then
            if at == nil then
                at = i
                env[i] = entry
                i = i + 1
            else
                table.remove(env, i)
            end
        else
            i = i + 1
        end
    end
    if at == nil then
        env[#env + 1] = entry
    end
end

--[[
image.env_get(cfg, name)

Hooks: any (pure).
Arguments:
  cfg   image config table ({ config = { Env = { "K=V", ... } } })
  name  variable name, a non-empty string without "="
Returns:
  string, the variable's value (of its last entry), or nil when it is not
  set (or cfg has no config.Env).
Example:
  image.env_get({ config = { Env = { "PATH=/usr/bin" } } }, "PATH") --> "/usr/bin"
]]
function image.env_get(cfg, name)
    check_table("env_get", "cfg", cfg)
    check_name("env_get", name)
    local env = env_of("env_get", cfg, false)
    if env == nil then
        return nil
    end
    local value = nil
    for i = 1, #env do
        value = entry_value(env[i], name) or value
    end
    return value
end

--[[
image.env_set(cfg, name, value)

Sets a variable: its entry is replaced where it stands, or appended to
config.Env when absent (config and config.Env are created when missing).
Hooks: rewrite (any hook that edits an image).
Arguments:
  cfg    image config table
  name   variable name, a non-empty string without "="
  value  string
Returns:
  string, the new value.
Example:
  local cfg = { config = { Env = { "A=1", "PATH=/bin", "B=2" } } }
  image.env_set(cfg, "PATH", "/usr/bin")
  --> cfg.config.Env is { "A=1", "PATH=/usr/bin", "B=2" }
]]
function image.env_set(cfg, name, value)
    check_table("env_set", "cfg", cfg)
    check_name("env_set", name)
    check_string("env_set", "value", value)
    set_entry(env_of("env_set", cfg, true), name, value)
    return value
end

--[[
image.env_append(cfg, name, suffix)

Appends text to a variable: new value = old value .. suffix, or just suffix
when it is not set. Position kept as in image.env_set.
Hooks: rewrite.
Arguments:
  cfg     image config table
  name    variable name, a non-empty string without "="
  suffix  string
Returns:
  string, the new value.
Example:
  local cfg = { config = { Env = { "PATH=/usr/bin" } } }
  image.env_append(cfg, "PATH", ":/ide/bin") --> "/usr/bin:/ide/bin"
]]
function image.env_append(cfg, name, suffix)
    check_table("env_append", "cfg", cfg)
    check_name("env_append", name)
    check_string("env_append", "suffix", suffix)
    local env = env_of("env_append", cfg, true)
    local value = (image.env_get(cfg, name) or "") .. suffix
    set_entry(env, name, value)
    return value
end

--[[
image.env_prepend(cfg, name, prefix)

Puts text in front of a variable: new value = prefix .. old value, or just
prefix when it is not set. Position kept as in image.env_set.
Hooks: rewrite.
Arguments:
  cfg     image config table
  name    variable name, a non-empty string without "="
  prefix  string
Returns:
  string, the new value.
Example:
  local cfg = { config = { Env = { "PATH=/usr/bin" } } }
  image.env_prepend(cfg, "PATH", "/ide/bin:") --> "/ide/bin:/usr/bin"
]]
function image.env_prepend(cfg, name, prefix)
    check_table("env_prepend", "cfg", cfg)
    check_name("env_prepend", name)
    check_string("env_prepend", "prefix", prefix)
    local env = env_of("env_prepend", cfg, true)
    local value = prefix .. (image.env_get(cfg, name) or "")
    set_entry(env, name, value)
    return value
end

--[[
image.env_unset(cfg, name)

Removes every "NAME=..." entry of a variable from config.Env; the other
entries keep their order. Creates nothing.
Hooks: rewrite.
Arguments:
  cfg   image config table
  name  variable name, a non-empty string without "="
Returns:
  string, the value it had (of its last entry), or nil when it was not set.
Example:
  local cfg = { config = { Env = { "A=1", "DEBUG=1", "B=2" } } }
  image.env_unset(cfg, "DEBUG") --> "1"; cfg.config.Env is { "A=1", "B=2" }
]]
function image.env_unset(cfg, name)
    check_table("env_unset", "cfg", cfg)
    check_name("env_unset", name)
    local env = env_of("env_unset", cfg, false)
    if env == nil then
        return nil
    end
    local old = nil
    local i = 1
    while i <= #env do
        local v = entry_value(env[i], name)
        if v ~= nil then
            old = v
            table.remove(env, i)
        else
            i = i + 1
        end
    end
    return old
end

--[[
image.label_set(cfg, key, value)

Sets a label in config.Labels (config and config.Labels created when
missing).
Hooks: rewrite.
Arguments:
  cfg    image config table
  key    non-empty string
  value  string
Returns:
  string, the value.
Example:
  local cfg = {}
  image.label_set(cfg, "org.opencontainers.image.source", "https://example.org/ide")
  --> cfg.config.Labels["org.opencontainers.image.source"] == "https://example.org/ide"
]]
function image.label_set(cfg, key, value)
    check_table("label_set", "cfg", cfg)
    check_key("label_set", "key", key)
    check_string("label_set", "value", value)
    local c = field_table("label_set", cfg, "config", "config", true)
    local labels = field_table("label_set", c, "Labels", "config.Labels", true)
    labels[key] = value
    return value
end

--[[
image.label_remove(cfg, key)

Removes a label from config.Labels. Creates nothing; an emptied Labels map
stays (as an empty map).
Hooks: rewrite.
Arguments:
  cfg  image config table
  key  non-empty string
Returns:
  string, the value it had, or nil when there was no such label.
Example:
  local cfg = { config = { Labels = { maintainer = "me" } } }
  image.label_remove(cfg, "maintainer") --> "me"
]]
function image.label_remove(cfg, key)
    check_table("label_remove", "cfg", cfg)
    check_key("label_remove", "key", key)
    local c = field_table("label_remove", cfg, "config", "config", false)
    local labels = c and field_table("label_remove", c, "Labels", "config.Labels", false)
    if labels == nil then
        return nil
    end
    local old = labels[key]
    labels[key] = nil
    return old
end

--[[
image.annotation_set(manifest, key, value)

Sets an annotation on a manifest (or an index, or a descriptor): its
`annotations` map is created when missing.
Hooks: rewrite.
Arguments:
  manifest  manifest table
  key       non-empty string
  value     string
Returns:
  string, the value.
Example:
  local m = { schemaVersion = 2, layers = {} }
  image.annotation_set(m, "org.example.workspace", "acme/ide")
  --> m.annotations["org.example.workspace"] == "acme/ide"
]]
function image.annotation_set(manifest, key, value)
    check_table("annotation_set", "manifest", manifest)
    check_key("annotation_set", "key", key)
    check_string("annotation_set", "value", value)
    local ann = field_table("annotation_set", manifest, "annotations", "annotations", true)
    ann[key] = value
    return value
end

--[[
image.annotation_remove(manifest, key)

Removes an annotation from a manifest. Creates nothing.
Hooks: rewrite.
Arguments:
  manifest  manifest table
  key       non-empty string
Returns:
  string, the value it had, or nil.
Example:
  local m = { annotations = { a = "1" } }
  image.annotation_remove(m, "a") --> "1"
]]
function image.annotation_remove(manifest, key)
    check_table("annotation_remove", "manifest", manifest)
    check_key("annotation_remove", "key", key)
    local ann = field_table("annotation_remove", manifest, "annotations", "annotations", false)
    if ann == nil then
        return nil
    end
    local old = ann[key]
    ann[key] = nil
    return old
end

-- The operations apply_env_modifiers knows, by the word after the prefix.
local MODIFIERS = {
    { word = "SET_", apply = image.env_set },
    { word = "APPEND_", apply = image.env_append },
    { word = "PREPEND_", apply = image.env_prepend },
}

local MODIFIER_OPTIONS = { prefix = true }

--[[
image.apply_env_modifiers(cfg, added_cfg [, opts])

Applies the env modifiers an added image (an IDE, a supervisor) carries in
its own config.Env to the assembled image's cfg, in the order they appear:
  <PREFIX>SET_X=v      X = v                       (image.env_set)
  <PREFIX>APPEND_X=v   X = old .. v  (or v)        (image.env_append)
  <PREFIX>PREPEND_X=v  X = v .. old  (or v)        (image.env_prepend)
Every other entry is ignored (it is not copied either), and so is an entry
with nothing after the operation word. Unlike Gitpod's registry-facade,
APPEND appends and PREPEND prepends.
Hooks: rewrite.
Arguments:
  cfg        image config table to change
  added_cfg  image config table of the added image (read only; may have no
             config or Env, which applies nothing)
  opts       optional table: { prefix = "GITPOD_ENV_" } (the default); an
             unknown key is an error
Returns:
  number, how many modifiers were applied.
Example:
  local cfg = { config = { Env = { "PATH=/usr/bin" } } }
  local ide = { config = { Env = { "GITPOD_ENV_PREPEND_PATH=/ide/bin:",
                                   "GITPOD_ENV_SET_EDITOR=code" } } }
  image.apply_env_modifiers(cfg, ide) --> 2
  --> cfg.config.Env is { "PATH=/ide/bin:/usr/bin", "EDITOR=code" }
]]
function image.apply_env_modifiers(cfg, added_cfg, opts)
    check_table("apply_env_modifiers", "cfg", cfg)
    check_table("apply_env_modifiers", "added_cfg", added_cfg)
    local prefix = DEFAULT_ENV_PREFIX
    if opts ~= nil then
        check_table("apply_env_modifiers", "opts", opts)
        for k in pairs(opts) do
            if not MODIFIER_OPTIONS[k] then
                error(string.format("image.apply_env_modifiers: unknown option %q (known: prefix)",
                    tostring(k)), 2)
            end
        end
        if opts.prefix ~= nil then
            if type(opts.prefix) ~= "string" or opts.prefix == "" then
                error("image.apply_env_modifiers: opts.prefix must be a non-empty string, got "
                    .. (opts.prefix == "" and "an empty string" or type(opts.prefix)), 2)
            end
            prefix = opts.prefix
        end
    end
    local added_env = env_of("apply_env_modifiers", added_cfg, false)
    if added_env == nil then
        return 0
    end
    -- Snapshot first: added_cfg may be cfg itself.
    local entries = {}
    for i = 1, #added_env do
        entries[i] = added_env[i]
    end
    local applied = 0
    for _, entry in ipairs(entries) do
        if type(entry) == "string" and entry:sub(1, #prefix) == prefix then
            local key, value = entry:match("^([^=]*)=(.*)$")
            if key then
                local op = key:sub(#prefix + 1)
                for _, m in ipairs(MODIFIERS) do
                    if op:sub(1, #m.word) == m.word then
                        local name = op:sub(#m.word + 1)
                        if name ~= "" then
                            m.apply(cfg, name, value)
                            applied = applied + 1
                        end
                        break
                    end
                end
            end
        end
    end
    return applied
end

return image
