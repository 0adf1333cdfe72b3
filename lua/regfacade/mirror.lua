--[[
regfacade.mirror: the default name mapping of a pull-through mirror.

It decides which configured upstream a request goes to and under which
repository name, the way spec/integration/CONTRACT.md describes:

  1. `?ns=HOST` (req.ns) selects the upstream whose host is HOST. Hosts are
     compared normalized: lowercase, the scheme's default port dropped
     ("host:443" is "host" for an https upstream), and the Docker Hub aliases
     docker.io, index.docker.io and registry-1.docker.io are one host.
     An ns that matches no upstream is 404 NAME_UNKNOWN.
  2. Otherwise a first path component equal to an upstream's name selects
     that upstream and is stripped ("hub/foo/bar" -> upstream hub, "foo/bar"),
     provided something is left after it.
  3. Otherwise config default_upstream, or the only upstream when there is
     exactly one; else 404 NAME_UNKNOWN.

Then, when the chosen upstream has library_prefix (when the config leaves it
unset: true for Docker Hub hosts only), a single-component repository gets
"library/" in front. The reference passes through unchanged.

The module is pure: no I/O, no globals, no state between calls. It reads the
configuration from require("regfacade").config at call time unless given one,
so a policy can also call it with a configuration of its own.

Functions: mirror.resolve, mirror.normalize_host, mirror.split_first,
mirror.upstream_host, mirror.upstream_for_ns.
]]

local mirror = {}

-- The three names of Docker Hub's registry, all mapped to the first.
local DOCKER_HUB = "docker.io"
local DOCKER_HUB_ALIASES = {
    ["docker.io"] = true,
    ["index.docker.io"] = true,
    ["registry-1.docker.io"] = true,
}

-- Default port per URL scheme: "host:443" and "host" are one https host.
local DEFAULT_PORTS = { https = "443", http = "80" }

-- The 404 every mapping failure becomes.
local function not_found(message)
    return nil, { status = 404, code = "NAME_UNKNOWN", message = message }
end

-- Upstream names in sorted order, so that every decision and every message
-- is the same whatever the order of keys in the config file.
-- In the server the configuration is read-only (its metatable is
-- protected: getmetatable answers false), so the sorted names of one
-- upstreams table never change and are computed once per Lua state; a
-- plain table (busted specs change theirs between calls) is sorted afresh
-- every time. Callers never change the list they get.
local sorted_cache = setmetatable({}, { __mode = "k" })

local function sorted_names(upstreams)
    local cached = sorted_cache[upstreams]
    if cached then
        return cached
    end
    local names = {}
    for name in pairs(upstreams) do
        names[#names + 1] = name
    end
    table.sort(names)
    if getmetatable(upstreams) == false then
        sorted_cache[upstreams] = names
    end
    return names
end

-- The scheme of a URL ("https"), lowercased, or nil.
local function url_scheme(url)
    if type(url) ~= "string" then
        return nil
    end
    local scheme = url:match("^(%a[%w+.%-]*)://")
    return scheme and scheme:lower()
end

--[[
mirror.normalize_host(host [, scheme])

Brings a registry host into the form hosts are compared in.

Arguments:
  host    string, "name" or "name:port" (an IPv6 literal in brackets is fine)
  scheme  optional string, the scheme of the upstream URL the host is
          compared against ("https" or "http"); when given, the scheme's
          default port (443 or 80) is dropped
Returns:
  string: lowercased, default port dropped, and any Docker Hub alias
  (docker.io, index.docker.io, registry-1.docker.io) as "docker.io".
  Raises an error when host is not a string.
Example:
  mirror.normalize_host("Registry-1.Docker.IO:443", "https") --> "docker.io"
  mirror.normalize_host("127.0.0.1:5001")                    --> "127.0.0.1:5001"
]]
function mirror.normalize_host(host, scheme)
    if type(host) ~= "string" then
        error("mirror.normalize_host: host must be a string, got " .. type(host), 2)
    end
    local h = host:lower()
    local port = scheme and DEFAULT_PORTS[scheme:lower()]
    if port then
        local bare = h:match("^(.*):" .. port .. "$")
        if bare and bare ~= "" then
            h = bare
        end
    end
    if DOCKER_HUB_ALIASES[h] then
        h = DOCKER_HUB
    end
    return h
end

--[[
mirror.split_first(repository)

Splits a repository name at its first "/".

Arguments:
  repository  string, e.g. "hub/library/alpine"
Returns:
  first  string, the first path component ("hub")
  rest   string, everything after the first "/" ("library/alpine"),
         or nil when the name has a single component
  Raises an error when repository is not a string.
Example:
  mirror.split_first("hub/library/alpine") --> "hub", "library/alpine"
  mirror.split_first("alpine")             --> "alpine", nil
]]
function mirror.split_first(repository)
    if type(repository) ~= "string" then
        error("mirror.split_first: repository must be a string, got " .. type(repository), 2)
    end
    local first, rest = repository:match("^([^/]*)/(.*)$")
    if first == nil then
        return repository, nil
    end
    return first, rest
end

--[[
mirror.upstream_host(upstream)

The host ("name:port" as configured) of an upstream entry of
regfacade.config.upstreams, normalized for comparison.

Arguments:
  upstream  table with `host` ("host:port") and/or `url`
            ("https://host:port/..."); `host` wins when both are set
Returns:
  string, the normalized host (see mirror.normalize_host, with the scheme
  of upstream.url), or nil when the entry names no host.
Example:
  mirror.upstream_host({ url = "https://registry-1.docker.io" }) --> "docker.io"
  mirror.upstream_host({ url = "http://127.0.0.1:5001", host = "127.0.0.1:5001" })
    --> "127.0.0.1:5001"
]]
function mirror.upstream_host(upstream)
    if type(upstream) ~= "table" then
        return nil
    end
    local scheme = url_scheme(upstream.url)
    local host = upstream.host
    if type(host) ~= "string" or host == "" then
        host = nil
        if type(upstream.url) == "string" then
            -- authority of the URL, without user info
            local authority = upstream.url:match("^%a[%w+.%-]*://([^/?#]*)")
            if authority then
                host = authority:match("@(.*)$") or authority
            end
        end
    end
    if host == nil or host == "" then
        return nil
    end
    return mirror.normalize_host(host, scheme)
end

--[[
mirror.upstream_for_ns(ns [, cfg])

Rule 1 alone: the name of the upstream whose host is ns.

Arguments:
  ns   string, the ?ns= parameter, e.g. "docker.io" or "127.0.0.1:5001"
  cfg  optional configuration table (default: require("regfacade").config)
Returns:
  string, the upstream's name, or nil when no upstream has that host.
  When several upstreams share the host, default_upstream wins if it is one
  of them, else the first by sorted name (so the answer never depends on
  the order of keys in the config file).
Example:
  -- upstreams = { hub = { url = "https://registry-1.docker.io" } }
  mirror.upstream_for_ns("index.docker.io") --> "hub"
]]
function mirror.upstream_for_ns(ns, cfg)
    cfg = cfg or require("regfacade").config
    if type(ns) ~= "string" then
        error("mirror.upstream_for_ns: ns must be a string, got " .. type(ns), 2)
    end
    local upstreams = type(cfg) == "table" and cfg.upstreams or nil
    if type(upstreams) ~= "table" then
        return nil
    end
    local found = nil
    for _, name in ipairs(sorted_names(upstreams)) do
        local up = upstreams[name]
        local host = mirror.upstream_host(up)
        if host ~= nil and host == mirror.normalize_host(ns, url_scheme(up.url)) then
            if name == cfg.default_upstream then
                return name
            end
            found = found or name
        end
    end
    return found
end

-- Whether "library/" goes in front of single-component names on upstream up.
-- An explicit library_prefix wins; unset means "only on Docker Hub", the
-- default CONTRACT.md gives (the core normally fills it in anyway).
local function wants_library_prefix(up)
    if type(up) ~= "table" then
        return false
    end
    if up.library_prefix ~= nil then
        return up.library_prefix == true
    end
    return mirror.upstream_host(up) == DOCKER_HUB
end

--[[
mirror.resolve(req [, cfg])

The default mapping: which upstream, repository and reference serve req.

Hooks: resolve (it is the default policy's resolve hook).
Arguments:
  req  table with at least `repository` (string, as requested) and
       optionally `ns` (string, the ?ns= parameter; nil or "" when absent)
       and `reference` (tag or digest, passed through)
  cfg  optional configuration table, shaped like require("regfacade").config:
       { upstreams = { NAME = { url =, host =, library_prefix = } },
         default_upstream = NAME or nil }
       default: require("regfacade").config, read at call time
Returns:
  { upstream = NAME, repository = "...", reference = req.reference }
  or nil, { status = 404, code = "NAME_UNKNOWN", message = "..." } when no
  upstream serves the request (unknown ns, no default, bad default_upstream,
  no upstreams). Raises an error when req or cfg is malformed.
Example:
  -- upstreams = { hub = { url = "https://registry-1.docker.io", library_prefix = true },
  --               ["local"] = { url = "http://127.0.0.1:5001" } },
  -- default_upstream = "hub"
  mirror.resolve({ repository = "alpine", reference = "3.19" })
    --> { upstream = "hub", repository = "library/alpine", reference = "3.19" }
  mirror.resolve({ repository = "local/acme/ide", reference = "1.2" })
    --> { upstream = "local", repository = "acme/ide", reference = "1.2" }
  mirror.resolve({ repository = "alpine", reference = "3.19", ns = "quay.io" })
    --> nil, { status = 404, code = "NAME_UNKNOWN",
    -->        message = "no upstream is configured for ns=quay.io" }
]]
function mirror.resolve(req, cfg)
    cfg = cfg or require("regfacade").config
    if type(req) ~= "table" then
        error("mirror.resolve: req must be a table, got " .. type(req), 2)
    end
    local repository = req.repository
    if type(repository) ~= "string" or repository == "" then
        error("mirror.resolve: req.repository must be a non-empty string, got "
            .. (repository == "" and "an empty string" or type(repository)), 2)
    end
    if type(cfg) ~= "table" or type(cfg.upstreams) ~= "table" then
        error("mirror.resolve: configuration must be a table with an `upstreams` table", 2)
    end
    local upstreams = cfg.upstreams
    local name

    -- Rule 1: ?ns=HOST
    local ns = req.ns
    if ns ~= nil and ns ~= "" then
        if type(ns) ~= "string" then
            error("mirror.resolve: req.ns must be a string or nil, got " .. type(ns), 2)
        end
        name = mirror.upstream_for_ns(ns, cfg)
        if name == nil then
            return not_found("no upstream is configured for ns=" .. ns)
        end
    end

    -- Rule 2: a leading path component naming an upstream, stripped
    if name == nil then
        local first, rest = mirror.split_first(repository)
        if rest ~= nil and rest ~= "" and upstreams[first] ~= nil then
            name, repository = first, rest
        end
    end

    -- Rule 3: default_upstream, or the only upstream
    if name == nil then
        local names = sorted_names(upstreams)
        local default = cfg.default_upstream
        if default ~= nil then
            if upstreams[default] == nil then
                return not_found(string.format(
                    "default_upstream %q is not a configured upstream (upstreams: %s)",
                    tostring(default), #names > 0 and table.concat(names, ", ") or "none"))
            end
            name = default
        elseif #names == 1 then
            name = names[1]
        elseif #names == 0 then
            return not_found("no upstream is configured")
        else
            return not_found(string.format(
                "no upstream for repository %q: neither ns= nor its first path component "
                    .. "names an upstream, and default_upstream is not set (upstreams: %s)",
                req.repository, table.concat(names, ", ")))
        end
    end

    -- Docker Hub's official images live under library/
    if wants_library_prefix(upstreams[name]) and not repository:find("/", 1, true) then
        repository = "library/" .. repository
    end

    return { upstream = name, repository = repository, reference = req.reference }
end

return mirror
