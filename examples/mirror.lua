--[[
examples/mirror.lua: a pull-through mirror policy, to copy and change.

This is exactly what regfacade does when the config names no policy. Point
the config at a copy ("policy": { "file": "my-policy.lua" }) and edit it.

A policy is a Lua 5.4 module that returns a table of hooks. Hooks never do
I/O: they get plain tables and return plain tables. This one only has
`resolve`, which says where each requested image comes from; with no
`authorize` hook every client may pull, and with no `rewrite` hook images
are served as the upstream has them.

`req` carries: method, kind ("manifest", "blob", "tags", "ping"),
repository (as requested), reference (tag or digest), ns (the ?ns=
parameter that containerd sends for mirrors, or nil), host, client
({ ip, user, password, token }) and headers (read-only, lowercase names).

Test a copy with busted the way mirror_spec.lua beside it does (mirror.json
runs it).
]]

-- regfacade.mirror holds the mapping rules; regfacade.config is the
-- "upstreams" / "default_upstream" part of the config file.
local mirror = require "regfacade.mirror"

return {
    resolve = function(req)
        local config = require("regfacade").config

        -- Rule 1, ?ns=HOST: containerd, configured with this facade as a
        -- mirror, says which registry it meant (e.g. ns=docker.io). Pick the
        -- upstream whose url has that host. Hosts compare lowercase, with
        -- "host:443" equal to "host" for https, and docker.io,
        -- index.docker.io and registry-1.docker.io counting as one.
        -- No such upstream: 404 NAME_UNKNOWN, never a guess.
        --
        -- Rule 2, a leading upstream name: /v2/local/acme/ide/manifests/1.2
        -- goes to upstream "local" as "acme/ide". The name is only taken
        -- when something follows it, so a repository called just "local"
        -- stays as it is.
        --
        -- Rule 3, the default: "default_upstream" from the config, or the
        -- only upstream when there is exactly one. Otherwise 404.
        --
        -- Then Docker Hub's official images: on an upstream with
        -- library_prefix (by default, the Docker Hub ones), "alpine" becomes
        -- "library/alpine". The tag or digest passes through unchanged.
        --
        -- To change a rule, return your own table instead, for example
        --   if req.repository:match("^internal/") then
        --     return { upstream = "local", repository = req.repository,
        --              reference = req.reference }
        --   end
        -- or refuse with: return nil, { status = 404, code = "NAME_UNKNOWN",
        --                               message = "not mirrored here" }
        return mirror.resolve(req, config)
    end,
}
