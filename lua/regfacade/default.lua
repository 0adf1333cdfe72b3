--[[
regfacade.default: the policy regfacade runs when the config names none
(config "policy" left out): a plain pull-through mirror.

It provides one hook, resolve, which is regfacade.mirror's mapping:
?ns=HOST, then a leading upstream name, then default_upstream (or the only
upstream), plus Docker Hub's "library/" for single-component names. It adds
no layers and rewrites nothing; authorize is left out, so every client may
pull. examples/mirror.lua is the same policy, commented, to copy from.
]]

local mirror = require "regfacade.mirror"

return {
    --[[
    resolve(req)

    Hook: resolve. Where the image comes from.
    Arguments:
      req  the request (method, kind, repository, reference, ns, host,
           client, headers); only repository, reference and ns are read
    Returns:
      { upstream = NAME, repository = "...", reference = "..." }, or
      nil, { status = 404, code = "NAME_UNKNOWN", message = "..." }
    Example:
      -- one upstream "hub" = https://registry-1.docker.io
      resolve({ kind = "manifest", repository = "alpine", reference = "latest" })
        --> { upstream = "hub", repository = "library/alpine", reference = "latest" }
    ]]
    resolve = function(req)
        return mirror.resolve(req)
    end,
}
