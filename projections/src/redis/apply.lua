-- One batch of the Redis projector, applied atomically (a script runs alone).
--
-- KEYS[1]  the generation's checkpoint
-- KEYS[2]  the generation's fence: the highest lease token a batch was written under
-- ARGV[1]  the checkpoint the batch was planned on (it read the rows it
--          changes at that checkpoint)
-- ARGV[2]  the lease token of the batch ('' when the projector holds no lease)
-- ARGV[3…] the batch's commands, each as its argument count followed by its
--          arguments (the checkpoint's SET is the last of them)
--
-- Returns {'ok', ''}; {'fenced', <newer token>} when a newer lease holder
-- wrote; {'moved', <stored checkpoint>} when another writer moved the
-- checkpoint since the batch read it. In both refusals nothing is written.
if ARGV[2] ~= '' then
  local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
  local token = tonumber(ARGV[2])
  if fence > token then
    return {'fenced', tostring(fence)}
  end
  -- Checked before any write: a moved checkpoint must not raise the fence.
  local stored = redis.call('GET', KEYS[1]) or '0'
  if stored ~= ARGV[1] then
    return {'moved', stored}
  end
  if fence < token then
    redis.call('SET', KEYS[2], ARGV[2])
  end
else
  local stored = redis.call('GET', KEYS[1]) or '0'
  if stored ~= ARGV[1] then
    return {'moved', stored}
  end
end
local i = 3
local n = #ARGV
while i <= n do
  local count = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + count))
  i = i + count + 1
end
return {'ok', ''}
