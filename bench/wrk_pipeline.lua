-- wrk script for the pipelined HTTP workload: each write carries DEPTH requests for
-- /plaintext (wrk ... URL -- DEPTH, default 16); wrk counts every response.
init = function(args)
   local depth = tonumber(args[1]) or 16
   local r = {}
   for i = 1, depth do
      r[i] = wrk.format(nil, "/plaintext")
   end
   req = table.concat(r)
end

request = function()
   return req
end
